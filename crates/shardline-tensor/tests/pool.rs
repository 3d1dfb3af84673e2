//! Sizing the shared worker pool (its own test binary: the pool is process-wide).

use shardline_tensor::pool;

#[test]
fn init_sizes_the_pool_once() {
    assert!(pool::init(0).is_err(), "0 threads must be refused");
    pool::init(3).expect("first init");
    assert_eq!(pool::num_threads(), 3);
    pool::init(3).expect("same size again is fine");
    let err = pool::init(2)
        .expect_err("a different size once running")
        .to_string();
    assert!(err.contains("already running with 3"), "{err}");
}
