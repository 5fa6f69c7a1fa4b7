//! Spool append throughput: prepare + commit of 2 KiB and 64 KiB records, with and
//! without fdatasync, in batches of 1, 8 and 64 (group commit). Reported as records/s.
//!
//! Files live under /var/tmp (a real disk, not tmpfs). Segment rollovers happen inside
//! the timed region, as on the accept path (the spool pre-creates the next 32 MiB
//! segment on a helper thread; the timed path waits only if it is not ready yet);
//! every ~512 MiB the spool is deleted and recreated outside the timed region so the
//! bench does not fill the disk. `segment_create` measures one rollover on its own.
//!
//! Run: `cargo bench -p tern-bench --bench spool`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tern_queue::{
    commit_batch, commit_batch_unsynced_for_bench, BodyType, Envelope, Recipient, ShardSpool,
    SpoolOptions,
};

const SEGMENT_SIZE: u64 = 32 << 20;
const RESET_AFTER_BYTES: u64 = 512 << 20;

fn envelope(size: u64) -> Envelope {
    Envelope {
        id: String::new(),
        sender: "sender@example.org".into(),
        recipients: vec![
            Recipient {
                addr: "rcpt1@example.net".into(),
                notify: 0,
                orcpt: None,
            },
            Recipient {
                addr: "rcpt2@example.net".into(),
                notify: 0,
                orcpt: None,
            },
        ],
        arrival_unix_micros: 1_700_000_000_000_000,
        size,
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        ret: None,
        envid: None,
        deliver_by: None,
        auth: Some("alice".into()),
        client_helo: "client.example".into(),
        client_addr: "192.0.2.7:51234".into(),
    }
}

/// The body as the DATA reader would hand it over: several 8 KiB `Bytes` chunks.
fn body(size: usize) -> Vec<Bytes> {
    let data: Vec<u8> = (0..size)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\r\n"[i % 28])
        .collect();
    data.chunks(8192).map(Bytes::copy_from_slice).collect()
}

struct BenchSpool {
    dir: PathBuf,
    spool: Option<ShardSpool>,
    written: u64,
}

impl BenchSpool {
    fn new(dir: PathBuf) -> Self {
        let mut s = BenchSpool {
            dir,
            spool: None,
            written: 0,
        };
        s.reset();
        s
    }
    fn reset(&mut self) {
        self.spool = None; // releases the lock
        let _ = std::fs::remove_dir_all(&self.dir);
        let (spool, _) = ShardSpool::open(
            &self.dir,
            0,
            SpoolOptions {
                segment_size: SEGMENT_SIZE,
            },
        )
        .expect("open spool");
        self.spool = Some(spool);
        self.written = 0;
    }
}

fn bench_dir(base: &Path, name: &str) -> PathBuf {
    base.join(name.replace('/', "_"))
}

fn spool_append(c: &mut Criterion) {
    let base = tempfile::Builder::new()
        .prefix("tern-spool-bench-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp");
    let mut group = c.benchmark_group("spool_append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for size in [2048usize, 65536] {
        let parts = body(size);
        let mut env = envelope(size as u64);
        for sync in [true, false] {
            for batch in [1usize, 8, 64] {
                group.throughput(Throughput::Elements(batch as u64));
                let label = format!(
                    "{}KiB/{}",
                    size / 1024,
                    if sync { "fdatasync" } else { "nosync" }
                );
                let mut state =
                    BenchSpool::new(bench_dir(base.path(), &format!("{label}-{batch}")));
                group.bench_with_input(BenchmarkId::new(label, batch), &batch, |b, &batch| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            if state.written > RESET_AFTER_BYTES {
                                state.reset();
                            }
                            let Some(spool) = state.spool.as_mut() else {
                                panic!("spool not open")
                            };
                            let start = Instant::now();
                            let mut pending = Vec::with_capacity(batch);
                            for _ in 0..batch {
                                env.id = spool.id_gen().next();
                                pending.push(spool.prepare(&env, &parts).expect("prepare"));
                            }
                            let results = if sync {
                                commit_batch(pending)
                            } else {
                                commit_batch_unsynced_for_bench(pending)
                            };
                            total += start.elapsed();
                            assert!(results.iter().all(|r| r.is_ok()), "commit failed");
                            state.written += (batch * size) as u64;
                        }
                        total
                    })
                });
                drop(state);
            }
        }
    }
    group.finish();

    // One rollover on its own: create + zero + fsync a 32 MiB segment.
    let mut group = c.benchmark_group("segment_create");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(SEGMENT_SIZE));
    group.bench_function("32MiB", |b| {
        let dir = bench_dir(base.path(), "create");
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_dir_all(&dir);
                let start = Instant::now();
                // open() on an empty shard creates its first segment.
                let spool = ShardSpool::open(
                    &dir,
                    0,
                    SpoolOptions {
                        segment_size: SEGMENT_SIZE,
                    },
                )
                .expect("open");
                total += start.elapsed();
                drop(spool);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, spool_append);
criterion_main!(benches);
