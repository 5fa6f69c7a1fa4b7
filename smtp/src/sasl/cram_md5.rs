//! CRAM-MD5 server side (RFC 2195).
//!
//! Owns: the `<random.timestamp@hostname>` challenge and checking
//! `user SP hex(HMAC-MD5(password, challenge))` against the stored HMAC
//! midstates (RFC 2195 §4 allows storing them instead of the password).
//!
//! Must never: compare the digest in variable time, or answer differently for
//! an unknown user (the dummy midstates run the same HMAC).

use super::{login_secrets, unhex16, verdict, AuthContext, AuthFailure, Step};
use crate::users::secrets::{cram_hmac, ct_eq16};

/// Longest response: a 255-octet user, a space, 32 hex digits.
const MAX_RESPONSE: usize = 255 + 1 + 32;

pub(super) struct Cram {
    challenge: Vec<u8>,
}

impl Cram {
    /// RFC 2195 §2: "the data encoded in the first ready response contains a
    /// presumptively arbitrary string of random digits, a timestamp, and the
    /// fully-qualified primary host name of the server" in msg-id form.
    pub(super) fn start(ctx: &mut AuthContext, fixed: Option<&str>) -> (Cram, Step) {
        let challenge = match fixed {
            Some(token) => format!("<{token}@{}>", ctx.hostname),
            None => {
                let secs = ctx.unix_secs;
                format!("<{}.{secs}@{}>", ctx.nonces.random_u64(), ctx.hostname)
            }
        }
        .into_bytes();
        let step = Step::Challenge(challenge.clone());
        (Cram { challenge }, step)
    }

    pub(super) fn finish(self, response: &[u8], ctx: &mut AuthContext) -> Step {
        if response.len() > MAX_RESPONSE {
            return Step::Failure(AuthFailure::Malformed);
        }
        // The user name may not contain a space in our store, but the digest
        // is always the last token: split at the last space.
        let Some(split) = response.iter().rposition(|&b| b == b' ') else {
            return Step::Failure(AuthFailure::Malformed);
        };
        let (user, digest) = (&response[..split], &response[split + 1..]);
        let (Ok(user), Some(digest)) = (std::str::from_utf8(user), unhex16(digest)) else {
            return Step::Failure(AuthFailure::Malformed);
        };
        if user.is_empty() {
            return Step::Failure(AuthFailure::Malformed);
        }
        // `user@realm` selects the realm (the midstates do not depend on it).
        let (secrets, found, _, _) = login_secrets(ctx.users, user, ctx.realm);
        let expected = cram_hmac(&secrets.cram_inner, &secrets.cram_outer, &self.challenge);
        let ok = ct_eq16(&expected, &digest);
        // CRAM-MD5 has no authzid.
        verdict(ok, found, user, None, ctx, None)
    }
}
