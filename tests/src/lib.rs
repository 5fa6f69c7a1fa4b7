//! End-to-end test support: starts real tern processes and talks to them over real sockets.
