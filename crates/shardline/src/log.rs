//! What the program tells its user on stderr: log lines through `tracing` (`RUST_LOG`, or the
//! level `-v`/`-q` pick), prefixed with the rank in a job of several ranks; progress bars for
//! long steps; and how a failed command's error is printed (once, headline first).

use std::fmt;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// `-v` (repeatable) and `-q`: how much goes to stderr.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct Verbosity {
    /// More detail on stderr: -v debug lines, -vv trace lines and error backtraces.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Errors only on stderr (no progress, timings or warnings).
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

impl Verbosity {
    fn level(self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "info",
            (false, 1) => "debug",
            (false, _) => "trace",
        }
    }
}

/// This process's rank when it is one of several (its lines carry it).
fn rank_of_several() -> Option<usize> {
    let world: usize = std::env::var("SHARDLINE_WORLD_SIZE").ok()?.parse().ok()?;
    let rank = std::env::var("SHARDLINE_RANK").ok()?.parse().ok()?;
    (world > 1).then_some(rank)
}

/// Lines as a command-line tool prints them: `rank 1: warning: ...`, info lines bare, debug and
/// trace lines with their module.
struct Lines {
    rank: Option<usize>,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some(rank) = self.rank {
            write!(w, "rank {rank}: ")?;
        }
        let meta = event.metadata();
        match *meta.level() {
            Level::ERROR => write!(w, "error: ")?,
            Level::WARN => write!(w, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(w, "debug {}: ", meta.target())?,
            Level::TRACE => write!(w, "trace {}: ", meta.target())?,
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Starts logging to stderr, and progress bars where stderr is a terminal. `RUST_LOG` (tracing's
/// filter syntax) overrides the level of `-v`/`-q`.
pub fn init(v: Verbosity) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(v.level()));
    let show_progress = !v.quiet && std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Lines {
            rank: rank_of_several(),
        })
        .try_init();
    if show_progress && rank_of_several().is_none_or(|r| r == 0) {
        shardline_model::progress::set_reporter(Box::new(Bars));
    }
}

/// Progress of the model's long steps as indicatif bars.
struct Bars;

thread_local! {
    static BAR: std::cell::RefCell<Option<ProgressBar>> = const { std::cell::RefCell::new(None) };
}

impl shardline_model::progress::Report for Bars {
    fn begin(&self, what: &str, total: u64) {
        let bar = ProgressBar::new(total).with_message(what.to_string());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        BAR.with(|b| *b.borrow_mut() = Some(bar));
    }

    fn advance(&self, n: u64) {
        BAR.with(|b| {
            if let Some(bar) = b.borrow().as_ref() {
                bar.inc(n)
            }
        });
    }

    fn end(&self) {
        BAR.with(|b| {
            if let Some(bar) = b.borrow_mut().take() {
                bar.finish_and_clear()
            }
        });
    }
}

/// The lines that print `err`: the headline, then each cause that says something new (a cause
/// whose text the line above already holds, such as an OS error repeated by its wrapper, is
/// left out).
pub fn error_lines(err: &anyhow::Error) -> Vec<String> {
    let mut lines = vec![format!("error: {err}")];
    if let Some(job) = err.downcast_ref::<crate::dist::JobFailed>() {
        lines.extend(job.detail_lines());
        return lines;
    }
    let mut previous = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !previous.contains(&text) {
            lines.push(format!("  caused by: {text}"));
        }
        previous = text;
    }
    lines
}

/// Prints a failed command's error on stderr; with `-vv` anyhow's full report (backtrace
/// included when `RUST_BACKTRACE` asks for one) follows.
pub fn print_error(err: &anyhow::Error, v: Verbosity) {
    let prefix = rank_of_several().map_or(String::new(), |r| format!("rank {r}: "));
    for line in error_lines(err) {
        eprintln!("{prefix}{line}");
    }
    if v.verbose >= 2 {
        eprintln!("{err:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::error_lines;
    use anyhow::Context;

    #[test]
    fn error_headline_first_and_repeated_causes_dropped() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Err::<(), _>(io)
            .context("cannot read /x/config.json: no such file")
            .context("cannot load the model in /x")
            .unwrap_err();
        assert_eq!(
            error_lines(&err),
            vec![
                "error: cannot load the model in /x".to_string(),
                "  caused by: cannot read /x/config.json: no such file".to_string(),
            ]
        );
    }
}
