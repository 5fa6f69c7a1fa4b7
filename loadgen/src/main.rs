//! tern-loadgen: placeholder until the load generator issue lands.
fn main() {
    eprintln!("tern-loadgen: not built yet");
    std::process::exit(64);
}
