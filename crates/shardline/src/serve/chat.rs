//! Chat templates: the messages of a chat completion turned into the model's prompt text, as
//! `transformers`' `apply_chat_template` renders them (Jinja with `trim_blocks` and
//! `lstrip_blocks`, loop controls, `tojson`, Python's string methods, `raise_exception`, and the
//! special tokens as variables). The template comes from the model directory
//! (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`); a model without one
//! gets [`ChatTemplate::fallback`].

use std::path::Path;

use anyhow::Context;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, Environment, ErrorKind, Value};
use serde::Deserialize;

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The plain format of a model without a chat template: each message as `<|ROLE|>`, a newline,
/// its content and a newline; then, to ask for the reply, `<|assistant|>` and a newline. A user
/// message "Hi" becomes `"<|user|>\nHi\n<|assistant|>\n"`.
const FALLBACK: &str = "{% for message in messages %}<|{{ message.role }}|>\n\
                        {{ message.content }}\n{% endfor %}\
                        {% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// The name of the template in its environment.
const NAME: &str = "chat";

/// A model's chat template, compiled, with the special tokens it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `chat_template` in `tokenizer_config.json`: one template, or named ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token in `tokenizer_config.json`: its text, or an added token's record.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
}

/// What `tokenizer_config.json` says of chats (the rest of it is ignored).
#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

impl TokenField {
    fn text(self) -> String {
        match self {
            TokenField::Text(s) | TokenField::Added { content: s } => s,
        }
    }
}

impl ChatTemplate {
    /// The template of the model in `dir`: `chat_template.jinja` when there is one (as
    /// `transformers` saves it), else `chat_template` of `tokenizer_config.json` (a string, or
    /// the one named "default" of a list), else [`ChatTemplate::fallback`]. The BOS and EOS
    /// tokens come from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<ChatTemplate> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str::<TokenizerConfig>(&text)
                    .with_context(|| format!("cannot read {}", config_path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", config_path.display()))
            }
        };
        let jinja_path = dir.join("chat_template.jinja");
        let jinja = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", jinja_path.display()))
            }
        };
        let (template, bos, eos) = match config {
            Some(c) => (c.chat_template, c.bos_token, c.eos_token),
            None => (None, None, None),
        };
        let source = match (jinja, template) {
            (Some(text), _) => Some(text),
            (None, Some(TemplateField::One(text))) => Some(text),
            (None, Some(TemplateField::Named(list))) => Some(
                list.into_iter()
                    .find(|t| t.name == "default")
                    .map(|t| t.template)
                    .with_context(|| {
                        format!(
                            "{}: chat_template lists no template named \"default\"",
                            config_path.display()
                        )
                    })?,
            ),
            (None, None) => None,
        };
        let bos = bos.map(TokenField::text).unwrap_or_default();
        let eos = eos.map(TokenField::text).unwrap_or_default();
        match source {
            Some(source) => ChatTemplate::new(source, bos, eos)
                .with_context(|| format!("the chat template of {}", dir.display())),
            None => Ok(ChatTemplate::fallback()),
        }
    }

    /// The template of the model `source` runs: a directory's ([`ChatTemplate::from_dir`]), a
    /// GGUF file's `tokenizer.chat_template`, else [`ChatTemplate::fallback`].
    pub fn for_source(source: &crate::engine::Source) -> anyhow::Result<ChatTemplate> {
        use crate::engine::Source;
        match source {
            Source::Dir { dir, .. } => ChatTemplate::from_dir(dir),
            Source::Gguf { path, .. } => {
                let m = shardline_model::gguf::GgufModel::open(path)?;
                match m.chat_template {
                    Some(t) => ChatTemplate::new(
                        t,
                        m.bos_token.unwrap_or_default(),
                        m.eos_token.unwrap_or_default(),
                    )
                    .with_context(|| format!("the chat template of {}", path.display())),
                    None => Ok(ChatTemplate::fallback()),
                }
            }
            Source::Preset { .. } | Source::Builtin => Ok(ChatTemplate::fallback()),
        }
    }

    /// The plain format for a model without a template: each message as `<|ROLE|>\nCONTENT\n`,
    /// then `<|assistant|>\n` when the reply is asked for.
    pub fn fallback() -> ChatTemplate {
        ChatTemplate::new(FALLBACK.to_string(), String::new(), String::new())
            .expect("the fallback chat template compiles")
    }

    /// Compiles `source` in an environment set up as `transformers` sets up its own.
    fn new(source: String, bos_token: String, eos_token: String) -> anyhow::Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text of `messages`, ending with the start of the assistant's reply when
    /// `add_generation_prompt`; the error is the template's (a `raise_exception` message, or
    /// the template failing on these messages).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                tools => None::<()>,
                documents => None::<()>,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                _ => format!("the chat template failed: {e}"),
            })
    }
}

/// `raise_exception(message)`: a template refusing its messages (roles out of order, say).
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)` (`", "` and `": "` between items without an indent), with no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from(out))
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let (open, close, is_map) = match value.kind() {
        ValueKind::Undefined | ValueKind::None => {
            out.push_str("null");
            return Ok(());
        }
        ValueKind::Bool => {
            out.push_str(if value.is_true() { "true" } else { "false" });
            return Ok(());
        }
        ValueKind::Number => {
            out.push_str(&value.to_string());
            return Ok(());
        }
        ValueKind::String => {
            json_string(value.as_str().unwrap_or_default(), out);
            return Ok(());
        }
        ValueKind::Seq | ValueKind::Iterable => ('[', ']', false),
        ValueKind::Map => ('{', '}', true),
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {kind} as JSON"),
            ))
        }
    };
    let break_line = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    out.push(open);
    let mut empty = true;
    for item in value.try_iter()? {
        if !empty {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        empty = false;
        break_line(out, depth + 1);
        if is_map {
            json_string(&item.to_string(), out);
            out.push_str(": ");
            write_json(&value.get_item(&item)?, indent, depth + 1, out)?;
        } else {
            write_json(&item, indent, depth + 1, out)?;
        }
    }
    if !empty {
        break_line(out, depth);
    }
    out.push(close);
    Ok(())
}

/// `s` as a JSON string, escaped as Python's `json.dumps` escapes it with `ensure_ascii=False`.
fn json_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::Value::from(s).to_string());
}

#[cfg(test)]
mod tests {
    //! Each expected text below was rendered by Jinja2 3.1 set up as `transformers` sets it up
    //! (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
    //! extensions=[loopcontrols])`, with `raise_exception`), then written out here by hand.

    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// Qwen2's template (ChatML, with a default system message).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// Mixtral-8x7B-Instruct's template: BOS and EOS tokens, and `raise_exception`.
    const MIXTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    /// A template over several lines (trim_blocks, lstrip_blocks), with Python string methods,
    /// `tojson` and a loop control.
    const MULTILINE: &str = "{%- for message in messages %}\n    {% if message.role == 'system' %}\n        {% continue %}\n    {% endif %}\n    {{ message.role.upper() }}: {{ message.content.strip() }}\n    {% if message.content.startswith('!') %}\n[{{ message.content | tojson }}]\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nASSISTANT:{% endif %}";

    fn template(source: &str, bos: &str, eos: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), bos.into(), eos.into()).unwrap()
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = template(CHATML, "", "<|endoftext|>");
        let text = t.render(&[msg("user", "Hi there")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn special_tokens_and_raise_exception() {
        let t = template(MIXTRAL, "<s>", "</s>");
        let chat = [
            msg("user", "Hi"),
            msg("assistant", "Hello"),
            msg("user", "Again"),
        ];
        assert_eq!(
            t.render(&chat, true).unwrap(),
            "<s>[INST] Hi [/INST]Hello</s>[INST] Again [/INST]"
        );
        let err = t
            .render(&[msg("user", "a"), msg("user", "b")], true)
            .unwrap_err();
        assert_eq!(
            err,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        );
    }

    #[test]
    fn blocks_are_trimmed_and_python_methods_work() {
        let t = template(MULTILINE, "", "");
        let chat = [
            msg("system", "s"),
            msg("user", "  hi  "),
            msg("user", "!x\""),
        ];
        assert_eq!(
            t.render(&chat, true).unwrap(),
            "    USER: hi\n    USER: !x\"\n[\"!x\\\"\"]\nASSISTANT:"
        );
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let source = "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|\
                      {{ [] | tojson }}{{ {} | tojson(indent=2) }}{{ [1, 2.5, none, true] | tojson }}";
        let t = template(source, "", "");
        assert_eq!(
            t.render(&[msg("user", "<a> é\n")], true).unwrap(),
            "[{\"role\": \"user\", \"content\": \"<a> é\\n\"}]|\
             {\n  \"role\": \"user\",\n  \"content\": \"<a> é\\n\"\n}|\
             []{}[1, 2.5, null, true]"
        );
    }

    #[test]
    fn fallback_is_the_documented_plain_format() {
        let t = ChatTemplate::fallback();
        let chat = [msg("system", "Be brief."), msg("user", "Hi")];
        assert_eq!(
            t.render(&chat, true).unwrap(),
            "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
        );
        assert_eq!(t.render(&chat[1..], false).unwrap(), "<|user|>\nHi\n");
    }

    #[test]
    fn from_dir_reads_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ChatTemplate::from_dir(dir.path())
                .unwrap()
                .render(&[msg("user", "Hi")], true)
                .unwrap(),
            "<|user|>\nHi\n<|assistant|>\n",
            "no tokenizer_config.json: the fallback"
        );
        let config = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": MIXTRAL},
            ],
            "model_max_length": 128,
        });
        let path = dir.path().join("tokenizer_config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        let chat = [msg("user", "Hi"), msg("assistant", "Yo")];
        assert_eq!(
            t.render(&chat, false).unwrap(),
            "<s>[INST] Hi [/INST]Yo</s>"
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        assert_eq!(
            t.render(&chat, false).unwrap(),
            "J</s>",
            "the .jinja file wins"
        );
        std::fs::write(&path, r#"{"chat_template": "{% if %}"}"#).unwrap();
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        assert!(
            ChatTemplate::from_dir(dir.path()).is_err(),
            "a syntax error"
        );
    }
}
