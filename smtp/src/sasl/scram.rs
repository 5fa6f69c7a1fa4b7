//! SCRAM-SHA-256 server side (RFC 5802 with RFC 7677's hash), without
//! channel binding.
//!
//! Owns: parsing client-first (gs2 header `n,,` / `y,,` with optional `a=`),
//! the server-first message (combined nonce, salt, iteration count), checking
//! the client proof against StoredKey, and the server-final `v=`.
//!
//! Must never: accept `p=` channel binding (we do not advertise
//! SCRAM-SHA-256-PLUS; RFC 5802 §6), accept a server nonce twice or one this
//! shard did not issue, reveal whether a user exists (unknown users get a
//! stable fake salt and the default iteration count, RFC 5802 §9), or see the
//! password (only StoredKey/ServerKey are stored, RFC 5802 §3).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::Mac;
use sha2::{Digest as _, Sha256};

use super::saslprep::saslprep;
use super::{verdict, AuthContext, AuthFailure, Step};
use crate::users::secrets::{ct_eq32, hmac_sha256, ScramSecrets, DEFAULT_SCRAM_ITERATIONS};
use crate::users::{Secrets, MAX_NAME_LEN};

/// Client nonces longer than this are not from a real client.
const MAX_CLIENT_NONCE: usize = 256;
/// Bound on each client message (well under RFC 4954's line limit).
const MAX_MESSAGE: usize = 4096;

pub(super) enum Scram {
    /// No initial response: waiting for client-first. Holds the fixed nonce
    /// of the test hook, if any.
    AwaitingFirst { fixed: Option<String> },
    /// server-first sent; waiting for client-final.
    AwaitingFinal(Box<Pending>),
}

pub(super) struct Pending {
    gs2_header: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
    /// Combined nonce (client part + server part).
    nonce: Vec<u8>,
    server_nonce: Vec<u8>,
    user: String,
    authzid: Option<String>,
    /// Copied from the snapshot at client-first, so a reload between the two
    /// messages cannot mix one salt with another file's keys.
    stored_key: [u8; 32],
    server_key: [u8; 32],
    found: bool,
}

fn fail(f: AuthFailure) -> (Option<Scram>, Step) {
    (None, Step::Failure(f))
}

/// RFC 5802 §5.1 saslname: `=2C` is `,`, `=3D` is `=`; any other `=` is an
/// error. Returns the decoded, SASLprep-ed name.
fn decode_saslname(v: &[u8]) -> Result<String, AuthFailure> {
    let s = std::str::from_utf8(v).map_err(|_| AuthFailure::Malformed)?;
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('=') {
        out.push_str(&rest[..pos]);
        let esc = rest.get(pos..pos + 3).ok_or(AuthFailure::Malformed)?;
        match esc {
            "=2C" | "=2c" => out.push(','),
            "=3D" | "=3d" => out.push('='),
            _ => return Err(AuthFailure::Malformed),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    if out.is_empty() || out.len() > MAX_NAME_LEN {
        return Err(AuthFailure::Malformed);
    }
    saslprep(&out)
        .map(|c| c.into_owned())
        .map_err(|_| AuthFailure::Malformed)
}

/// RFC 5802 §7: `printable = %x21-2B / %x2D-7E` (no comma).
fn is_printable_nonce(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

impl Scram {
    pub(super) fn awaiting_first(fixed: Option<&str>) -> Scram {
        Scram::AwaitingFirst {
            fixed: fixed.map(str::to_owned),
        }
    }

    /// Handle client-first-message; answer server-first-message.
    pub(super) fn client_first(
        msg: &[u8],
        ctx: &mut AuthContext,
        fixed: Option<&str>,
    ) -> (Option<Scram>, Step) {
        use AuthFailure::Malformed;
        if msg.len() > MAX_MESSAGE {
            return fail(Malformed);
        }
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let mut it = msg.splitn(3, |&b| b == b',');
        let (Some(flag), Some(authz), Some(bare)) = (it.next(), it.next(), it.next()) else {
            return fail(Malformed);
        };
        match flag {
            // "n": client does not support channel binding; "y": it does but
            // thinks we do not — true, we advertise no -PLUS (RFC 5802 §6).
            b"n" | b"y" => {}
            _ => return fail(Malformed), // "p=..." or garbage
        }
        let authzid = if authz.is_empty() {
            None
        } else {
            match authz.strip_prefix(b"a=").map(decode_saslname) {
                Some(Ok(z)) => Some(z),
                _ => return fail(Malformed),
            }
        };
        let gs2_header = msg[..flag.len() + authz.len() + 2].to_vec();

        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(|&b| b == b',');
        let (Some(user_attr), Some(nonce_attr)) = (attrs.next(), attrs.next()) else {
            return fail(Malformed);
        };
        // m= (mandatory extension) is unknown to us: RFC 5802 §5.1 "the
        // server MUST fail authentication" (it also fails the n= check).
        let Some(user) = user_attr.strip_prefix(b"n=") else {
            return fail(Malformed);
        };
        let Some(client_nonce) = nonce_attr.strip_prefix(b"r=") else {
            return fail(Malformed);
        };
        if !is_printable_nonce(client_nonce) || client_nonce.len() > MAX_CLIENT_NONCE {
            return fail(Malformed);
        }
        let user = match decode_saslname(user) {
            Ok(u) => u,
            Err(f) => return fail(f),
        };

        let server_nonce = match fixed {
            Some(n) => {
                ctx.nonces.register(n.as_bytes(), ctx.now);
                n.to_owned()
            }
            None => ctx.nonces.issue(ctx.now),
        };
        // `user@realm` selects the realm (Cyrus's first-`@` split).
        let (lookup_user, lookup_realm) = crate::users::split_login(&user, ctx.realm);
        let (salt, stored_key, server_key, iterations, found) =
            match ctx.users.lookup(lookup_user, lookup_realm) {
                Some(Secrets {
                    scram:
                        ScramSecrets {
                            iterations,
                            salt,
                            stored_key,
                            server_key,
                        },
                    ..
                }) => (salt.clone(), *stored_key, *server_key, *iterations, true),
                None => {
                    let d = &Secrets::dummy().scram;
                    (
                        ctx.users.fake_salt(lookup_user, lookup_realm).to_vec(),
                        d.stored_key,
                        d.server_key,
                        DEFAULT_SCRAM_ITERATIONS,
                        false,
                    )
                }
            };
        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(B64.encode(&salt).as_bytes());
        server_first.extend_from_slice(format!(",i={iterations}").as_bytes());
        let step = Step::Challenge(server_first.clone());
        let pending = Pending {
            gs2_header,
            client_first_bare: bare.to_vec(),
            server_first,
            nonce,
            server_nonce: server_nonce.into_bytes(),
            user,
            authzid,
            stored_key,
            server_key,
            found,
        };
        (Some(Scram::AwaitingFinal(Box::new(pending))), step)
    }

    pub(super) fn step(self, msg: &[u8], ctx: &mut AuthContext) -> (Option<Scram>, Step) {
        match self {
            Scram::AwaitingFirst { fixed } => Self::client_first(msg, ctx, fixed.as_deref()),
            Scram::AwaitingFinal(p) => (None, p.client_final(msg, ctx)),
        }
    }
}

impl Pending {
    /// client-final-message = channel-binding "," nonce ["," extensions] "," proof
    fn client_final(self, msg: &[u8], ctx: &mut AuthContext) -> Step {
        use AuthFailure::Malformed;
        // The exchange ends here whatever the client sent: consume the server
        // nonce first so it can never be accepted again.
        let live = ctx.nonces.consume(&self.server_nonce, ctx.now).is_ok();
        if msg.len() > MAX_MESSAGE {
            return Step::Failure(Malformed);
        }
        // The proof is the last attribute; its base64 contains no comma.
        let Some(split) = msg.windows(3).rposition(|w| w == b",p=") else {
            return Step::Failure(Malformed);
        };
        let without_proof = &msg[..split];
        let Ok(proof) = B64.decode(&msg[split + 3..]) else {
            return Step::Failure(Malformed);
        };
        let Ok(proof) = <[u8; 32]>::try_from(proof) else {
            return Step::Failure(Malformed);
        };
        let mut attrs = without_proof.split(|&b| b == b',');
        let (Some(c), Some(r)) = (attrs.next(), attrs.next()) else {
            return Step::Failure(Malformed);
        };
        // c= is base64(gs2-header) when there is no channel binding data.
        let Some(cb) = c.strip_prefix(b"c=").and_then(|v| B64.decode(v).ok()) else {
            return Step::Failure(Malformed);
        };
        if cb != self.gs2_header {
            return Step::Failure(Malformed);
        }
        let Some(nonce) = r.strip_prefix(b"r=") else {
            return Step::Failure(Malformed);
        };
        // RFC 5802 §5.1: the nonce must be exactly the combined one we sent.
        if nonce != self.nonce.as_slice() || !live {
            return Step::Failure(AuthFailure::Replay);
        }

        // AuthMessage = client-first-message-bare "," server-first-message ","
        //               client-final-message-without-proof   (RFC 5802 §3)
        let auth_message = |key: &[u8; 32]| -> [u8; 32] {
            let mut mac = hmac_sha256(key);
            mac.update(&self.client_first_bare);
            mac.update(b",");
            mac.update(&self.server_first);
            mac.update(b",");
            mac.update(without_proof);
            mac.finalize().into_bytes().into()
        };
        // ClientKey = ClientProof XOR ClientSignature; H(ClientKey) must be StoredKey.
        let client_signature = auth_message(&self.stored_key);
        let client_key: [u8; 32] = std::array::from_fn(|i| proof[i] ^ client_signature[i]);
        let ok = ct_eq32(&Sha256::digest(client_key).into(), &self.stored_key);
        let server_signature = auth_message(&self.server_key);
        let server_final = format!("v={}", B64.encode(server_signature)).into_bytes();
        verdict(
            ok,
            self.found,
            &self.user,
            self.authzid.as_deref(),
            ctx,
            Some(server_final),
        )
    }
}
