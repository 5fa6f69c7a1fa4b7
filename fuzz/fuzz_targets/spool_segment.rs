//! Arbitrary bytes as a segment file: recovery must never panic, and must still be able to
//! open the spool (cutting or skipping what it cannot read).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile_dir() else { return };
    let shard = dir.join("shard-000");
    let _ = std::fs::create_dir_all(&shard);
    let _ = std::fs::write(shard.join("0000000000000001.seg"), data);
    let _ = tern_queue::scan_spool(&dir);
    let _ = tern_queue::ShardSpool::open(&dir, 0, tern_queue::SpoolOptions { segment_size: 1 << 20 });
    let _ = std::fs::remove_dir_all(&dir);
});

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "tern-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
