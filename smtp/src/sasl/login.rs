//! LOGIN server side (draft-murchison-sasl-login-00, obsolete but widely
//! used by Outlook-era clients).
//!
//! Owns: the "Username:" / "Password:" challenges and the two-step flow; an
//! initial response is taken as the user name (common client behaviour).
//!
//! Must never: echo or log the user name or password; the password check is
//! [`super::plain::check_password`], identical to PLAIN's.

use super::plain::check_password;
use super::{verdict, AuthContext, AuthFailure, Step};

const MAX_USER: usize = 255;
const MAX_PASSWORD: usize = 1024;

pub(super) struct Login {
    user: Option<String>,
}

fn user_from(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() || bytes.len() > MAX_USER {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

impl Login {
    pub(super) fn start(initial: Option<&[u8]>) -> (Option<Login>, Step) {
        match initial {
            None => (
                Some(Login { user: None }),
                Step::Challenge(b"Username:".to_vec()),
            ),
            Some(bytes) => match user_from(bytes) {
                Some(user) => (
                    Some(Login { user: Some(user) }),
                    Step::Challenge(b"Password:".to_vec()),
                ),
                None => (None, Step::Failure(AuthFailure::Malformed)),
            },
        }
    }

    pub(super) fn step(self, response: &[u8], ctx: &mut AuthContext) -> (Option<Login>, Step) {
        match self.user {
            None => match user_from(response) {
                Some(user) => (
                    Some(Login { user: Some(user) }),
                    Step::Challenge(b"Password:".to_vec()),
                ),
                None => (None, Step::Failure(AuthFailure::Malformed)),
            },
            Some(user) => {
                if response.is_empty() || response.len() > MAX_PASSWORD {
                    return (None, Step::Failure(AuthFailure::Malformed));
                }
                let (ok, found) = check_password(&user, response, ctx);
                (None, verdict(ok, found, &user, None, ctx, None))
            }
        }
    }
}
