//! The rendezvous under abuse, in one process (ranks on threads): garbage bytes, a short message,
//! a silent client and a rank with the wrong job token neither crash nor stall it, and the real
//! ranks still form a working group.

use std::io::Write;
use std::time::{Duration, Instant};

use shardline_comm::{CommError, Config, Group, ReduceOp, TransportChoice};

use crate::common::connect;

fn cfg(rank: usize, addr: &str, token: &str, secs: u64) -> Config {
    let mut c = Config::new(rank, 2, addr, token);
    c.timeout = Duration::from_secs(secs);
    c.transport = TransportChoice::Tcp;
    c
}

#[test]
fn abusive_clients_are_refused_and_the_job_still_forms() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let rank0 = {
        let c = cfg(0, &addr, "good", 20);
        std::thread::spawn(move || Group::init(&c))
    };
    let start = Instant::now();
    // A silent client that stays connected, garbage, and a message shorter than it claims.
    let _silent = connect(&addr);
    connect(&addr).write_all(&[0xff; 64]).unwrap();
    let mut short = connect(&addr);
    short.write_all(&100u32.to_le_bytes()).unwrap();
    short.write_all(&[1; 10]).unwrap();
    drop(short);
    // A rank with the wrong token is refused (it sees the connection closed without a table).
    let bad = Group::init(&cfg(1, &addr, "wrong", 3));
    match bad {
        Err(CommError::Bootstrap(why)) => assert!(
            why.contains("without sending the table") && why.contains("job token"),
            "{why}"
        ),
        Err(e) => panic!("the wrong token failed oddly: {e}"),
        Ok(_) => panic!("a rank with the wrong token joined"),
    }
    // The real rank 1 still gets in, well before the silent client's deadline runs out.
    let c1 = cfg(1, &addr, "good", 20);
    let rank1 = std::thread::spawn(move || Group::init(&c1));
    let g0 = rank0.join().unwrap().expect("rank 0 formed the group");
    let g1 = rank1.join().unwrap().expect("rank 1 formed the group");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the rendezvous stalled: {:?}",
        start.elapsed()
    );
    let t = std::thread::spawn(move || {
        let mut v = vec![2.0f32; 5];
        let r = g1.all_reduce(&mut v, ReduceOp::Sum).map(|_| v);
        (r, g1)
    });
    let mut v = vec![1.0f32; 5];
    g0.all_reduce(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v, vec![3.0; 5]);
    let (r, g1) = t.join().unwrap();
    assert_eq!(r.unwrap(), vec![3.0; 5]);
    // Dropping a group is collective (a closing barrier): drop both at once.
    let closing = std::thread::spawn(move || drop(g1));
    drop(g0);
    closing.join().unwrap();
}

#[test]
fn a_missing_rank_times_out_naming_what_was_awaited() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let t = Instant::now();
    let e = Group::init(&cfg(0, &addr, "good", 1))
        .err()
        .expect("no rank 1, no group");
    assert!(
        matches!(e, CommError::Timeout { .. }) && e.to_string().contains("1 rank"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_job_without_a_token_listens_on_loopback_only() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // Rank 0 with the rendezvous on every address, and a rank listening everywhere: refused
    // before anything listens, naming the variable.
    let port = addr.rsplit(':').next().unwrap();
    let everywhere = cfg(0, &format!("0.0.0.0:{port}"), "", 5);
    let e = Group::init(&everywhere).err().expect("refused");
    assert!(
        matches!(e, CommError::Config(_)) && e.to_string().contains("SHARDLINE_JOB_TOKEN"),
        "{e}"
    );
    assert!(e.to_string().contains("0.0.0.0"), "{e}");
    let mut wide = cfg(1, &addr, "", 5);
    wide.listen = Some([0, 0, 0, 0].into());
    let e = Group::init(&wide).err().expect("refused");
    assert!(e.to_string().contains("SHARDLINE_JOB_TOKEN"), "{e}");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "something listened"
    );
    // On loopback a job without a token still forms.
    let c1 = cfg(1, &addr, "", 10);
    let rank1 = std::thread::spawn(move || Group::init(&c1));
    let g0 = Group::init(&cfg(0, &addr, "", 10)).expect("rank 0 on loopback");
    let g1 = rank1.join().unwrap().expect("rank 1 on loopback");
    let closing = std::thread::spawn(move || drop(g1));
    drop(g0);
    closing.join().unwrap();
}

#[test]
fn a_joined_rank_waiting_for_the_table_times_out_naming_rank_0_and_the_wait() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let three = |rank, secs| {
        let mut c = cfg(rank, &addr, "good", secs);
        c.world_size = 3;
        c
    };
    let c0 = three(0, 3);
    let rank0 = std::thread::spawn(move || Group::init(&c0));
    // Rank 2 never comes: rank 1 waits for the table, rank 0 for rank 2.
    let e = Group::init(&three(1, 1))
        .err()
        .expect("no table without rank 2");
    let msg = e.to_string();
    assert!(matches!(e, CommError::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("rank 1 waiting for the table from rank 0") && msg.contains("1.0 s"),
        "{msg}"
    );
    assert!(!msg.contains("os error") && !msg.contains("token"), "{msg}");
    let e = rank0.join().unwrap().err().expect("rank 2 never joined");
    assert!(e.to_string().contains("missing: rank 2"), "{e}");

    // When rank 0 gives up first, the ranks that joined hear why from it.
    let c0 = three(0, 1);
    let rank0 = std::thread::spawn(move || Group::init(&c0));
    let e = Group::init(&three(1, 5))
        .err()
        .expect("no table without rank 2");
    let msg = e.to_string();
    assert!(
        msg.contains("rank 0 at") && msg.contains("gave up") && msg.contains("missing: rank 2"),
        "{msg}"
    );
    assert!(!msg.contains("token"), "{msg}");
    assert!(rank0.join().unwrap().is_err());
}
