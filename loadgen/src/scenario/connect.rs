//! `connect`: connection rate to the greeting (after the TLS handshake with `--tls`, or
//! after STARTTLS and its handshake with `--starttls`).

use std::time::Instant;

use super::{open, quit, Core, Worker};
use crate::conn::OpError;

pub async fn op(core: &Core, w: &Worker, origin: Instant, measured: bool) -> Result<(), OpError> {
    let start = Instant::now();
    let s = open(core, w, measured).await?;
    core.record(measured, "connect", origin.elapsed());
    if core.cfg.open_loop {
        core.record(measured, "connect_service", start.elapsed());
    }
    quit(s).await;
    Ok(())
}
