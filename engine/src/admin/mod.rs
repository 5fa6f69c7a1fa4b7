//! The admin socket, in two layers: `proto` (the wire format and the client, shared by the
//! server and the CLI) and `server` (the socket's thread in the running server, which talks
//! to the shards only through `shard::Control`). `server` uses `proto`; nothing here is
//! used by `proto`.

pub mod proto;
pub mod server;
