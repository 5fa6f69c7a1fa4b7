//! PLAIN server side (RFC 4616), and the password check shared with LOGIN.
//!
//! Owns: splitting `[authzid] NUL authcid NUL passwd`, the authzid rule, and
//! [`check_password`]: verifying a cleartext password against the stored
//! DIGEST-MD5 `H(user:realm:password)` (one MD5; see docs/decisions.md,
//! "SASL secrets and the user store", for why this secret and not SCRAM's).
//!
//! Must never: keep the password beyond the call, log it, or treat an
//! unknown user differently from a wrong password.

use super::{login_secrets, verdict, AuthContext, AuthFailure, Step};
use crate::users::secrets::{ct_eq16, digest_ha1};

/// RFC 4616 §2: servers MUST accept at least 255 octets for each field; we
/// accept up to 1024 so long passphrases work, and refuse more.
const MAX_FIELD: usize = 1024;

/// Is `password` the password of `login` (`user` in the default realm, or
/// `user@realm`)? Returns `(matches, user_exists)`; both always computed.
pub(super) fn check_password(login: &str, password: &[u8], ctx: &AuthContext) -> (bool, bool) {
    let (secrets, found, user, realm) = login_secrets(ctx.users, login, ctx.realm);
    let candidate = digest_ha1(user, realm, password);
    (ct_eq16(&candidate, &secrets.digest_ha1), found)
}

pub(super) fn verify(message: &[u8], ctx: &mut AuthContext) -> Step {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next())
    else {
        return Step::Failure(AuthFailure::Malformed);
    };
    // RFC 4616 §2: authcid and passwd are 1*SAFE (non-empty, no NUL — a NUL
    // in passwd would mean a fourth field).
    if authcid.is_empty()
        || passwd.is_empty()
        || passwd.contains(&0)
        || [authzid, authcid, passwd]
            .iter()
            .any(|f| f.len() > MAX_FIELD)
    {
        return Step::Failure(AuthFailure::Malformed);
    }
    let (Ok(authzid), Ok(authcid)) = (std::str::from_utf8(authzid), std::str::from_utf8(authcid))
    else {
        return Step::Failure(AuthFailure::Malformed);
    };
    let (ok, found) = check_password(authcid, passwd, ctx);
    let authzid = (!authzid.is_empty()).then_some(authzid);
    verdict(ok, found, authcid, authzid, ctx, None)
}
