//! `auth`: one AUTH handshake per connection: connect, greeting, EHLO, [STARTTLS, EHLO],
//! AUTH, QUIT. Records `handshake` (connect to 235) and `auth` (AUTH command to 235).

use std::time::Instant;

use super::{authenticate, open, quit, Core, Worker};
use crate::conn::OpError;

pub async fn op(core: &Core, w: &Worker, origin: Instant, measured: bool) -> Result<(), OpError> {
    let mech = core.cfg.mech.expect("auth scenario has a mechanism");
    let start = Instant::now();
    let mut s = open(core, w, measured).await?;
    let auth = authenticate(core, &mut s, mech).await?;
    core.record(measured, "handshake", origin.elapsed());
    core.record(measured, "auth", auth);
    if core.cfg.open_loop {
        core.record(measured, "handshake_service", start.elapsed());
    }
    quit(s).await;
    Ok(())
}
