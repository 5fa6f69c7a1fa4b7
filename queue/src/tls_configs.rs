//! One shard's rustls client configurations for outbound STARTTLS, one per trust policy
//! ([`TrustKey`]: no verification; verification against a CA file; against the system
//! bundle).
//!
//! Owns: building each configuration once, on glommio's blocking thread (reading a CA
//! bundle is file I/O), and handing the same `Arc<ClientConfig>` to every connection of
//! the shard under that policy. Besides saving the rebuild, that is what makes TLS session
//! resumption to next hops work: the session store lives in the configuration
//! (`client::tls::SESSION_CACHE`). Rebuilding them on a reload, so that a changed CA file
//! takes effect.
//!
//! Must never: share a configuration between shards (its session store has a mutex; one
//! per shard is never contended), share one between trust policies (a session set up
//! without verification must never be resumed for a hop that requires it), keep a
//! configuration whose CA file can no longer be read after a reload (fail closed: those
//! deliveries defer), cache a failed build, or read a file on the shard thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;

use crate::client::tls::{client_config, TlsConfigError};
use crate::client::ClientOptions;

/// What a client configuration depends on: whether certificates are verified and, if so,
/// against which CA file (`None`: the system bundle). Without verification the CA file
/// plays no part, so every non-verifying policy shares one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustKey {
    pub verify: bool,
    pub ca_file: Option<PathBuf>,
}

impl TrustKey {
    /// The key of the trust settings in `o`.
    pub fn of(o: &ClientOptions) -> TrustKey {
        TrustKey {
            verify: o.verify_certs,
            ca_file: if o.verify_certs {
                o.ca_file.clone()
            } else {
                None
            },
        }
    }
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Configurations rebuilt (now in use, with empty session stores).
    pub rebuilt: usize,
    /// Policies whose configuration could not be built: removed from the cache, so their
    /// deliveries defer with this error until the file is fixed.
    pub failed: Vec<(TrustKey, TlsConfigError)>,
}

/// The shard's configurations. Shard-local: no `Send`, no locks.
pub struct TlsConfigs {
    built: RefCell<HashMap<TrustKey, Arc<ClientConfig>>>,
    /// One build at a time: deliveries that need the same missing configuration at once
    /// wait for the first one's build instead of each reading the CA file.
    building: glommio::sync::Semaphore,
}

impl Default for TlsConfigs {
    fn default() -> TlsConfigs {
        TlsConfigs {
            built: RefCell::new(HashMap::new()),
            building: glommio::sync::Semaphore::new(1),
        }
    }
}

impl TlsConfigs {
    /// The configuration for `key`: the cached one, else built now (on the blocking
    /// thread) and cached. A failed build is not cached: the next delivery tries again.
    pub async fn get(&self, key: &TrustKey) -> Result<Arc<ClientConfig>, TlsConfigError> {
        if let Some(c) = self.built.borrow().get(key) {
            return Ok(c.clone());
        }
        // Err only if the semaphore was closed, which nothing does: build anyway.
        let _permit = self.building.acquire_permit(1).await;
        if let Some(c) = self.built.borrow().get(key) {
            return Ok(c.clone());
        }
        let c = build(key.clone()).await?;
        self.built.borrow_mut().insert(key.clone(), c.clone());
        Ok(c)
    }

    /// Builds the configurations of `keys` not built yet (at runner start, from the
    /// routes and policies configured), so the first deliveries do not wait for them.
    /// Failures are returned, not cached.
    pub async fn prepare(
        &self,
        keys: impl IntoIterator<Item = TrustKey>,
    ) -> Vec<(TrustKey, TlsConfigError)> {
        let mut failed = Vec::new();
        for k in keys {
            if let Err(e) = self.get(&k).await {
                failed.push((k, e));
            }
        }
        failed
    }

    /// Rebuilds every cached configuration (a reload: CA files may have changed). Each
    /// success replaces the old configuration, and with it its session store: sessions
    /// verified against the old trust anchors are not resumed. A failure removes it.
    pub async fn rebuild(&self) -> Rebuilt {
        let _permit = self.building.acquire_permit(1).await;
        let keys: Vec<TrustKey> = self.built.borrow().keys().cloned().collect();
        let mut out = Rebuilt::default();
        for k in keys {
            match build(k.clone()).await {
                Ok(c) => {
                    self.built.borrow_mut().insert(k, c);
                    out.rebuilt += 1;
                }
                Err(e) => {
                    self.built.borrow_mut().remove(&k);
                    out.failed.push((k, e));
                }
            }
        }
        out
    }

    /// Policies with a configuration built.
    pub fn len(&self) -> usize {
        self.built.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds on glommio's blocking thread: the CA file read never stalls the shard.
async fn build(key: TrustKey) -> Result<Arc<ClientConfig>, TlsConfigError> {
    glommio::executor()
        .spawn_blocking(move || {
            // glommio reads an uninitialised result if the closure panics.
            std::panic::catch_unwind(|| client_config(key.verify, key.ca_file.as_deref()))
                .unwrap_or(Err(TlsConfigError::Panicked))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};

    fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
        LocalExecutorBuilder::new(Placement::Unbound)
            .ring_depth(64)
            .io_memory(128 << 10)
            .make()
            .unwrap()
            .run(f)
    }

    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .unwrap()
            .cert
            .pem()
    }

    #[test]
    fn built_once_per_key_failures_not_cached_and_a_rebuild_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem()).unwrap();
        run(async move {
            let cache = TlsConfigs::default();
            let verify = TrustKey {
                verify: true,
                ca_file: Some(ca.clone()),
            };
            let plain = TrustKey {
                verify: false,
                ca_file: None,
            };
            let a = cache.get(&verify).await.unwrap();
            let b = cache.get(&verify).await.unwrap();
            assert!(Arc::ptr_eq(&a, &b), "the same configuration, not a rebuild");
            let p = cache.get(&plain).await.unwrap();
            assert!(!Arc::ptr_eq(&a, &p), "one configuration per trust policy");
            assert_eq!(cache.len(), 2);

            // The file changes: the cached configuration stays until a rebuild.
            std::fs::write(&ca, "not a certificate\n").unwrap();
            assert!(Arc::ptr_eq(&a, &cache.get(&verify).await.unwrap()));
            let r = cache.rebuild().await;
            assert_eq!(r.rebuilt, 1, "the no-verify one");
            assert!(
                matches!(r.failed.as_slice(), [(k, TlsConfigError::NoCa(_))] if *k == verify),
                "{r:?}"
            );
            // Fail closed, and not cached: every use tries the file again.
            assert!(matches!(
                cache.get(&verify).await,
                Err(TlsConfigError::NoCa(_))
            ));
            std::fs::remove_file(&ca).unwrap();
            assert!(matches!(
                cache.get(&verify).await,
                Err(TlsConfigError::Read { .. })
            ));
            std::fs::write(&ca, ca_pem()).unwrap();
            let c = cache.get(&verify).await.unwrap();
            assert!(!Arc::ptr_eq(&a, &c), "a new configuration after the fix");
            assert!(Arc::ptr_eq(&c, &cache.get(&verify).await.unwrap()));
        });
    }

    #[test]
    fn the_trust_key_ignores_a_ca_file_without_verification() {
        let mut o = ClientOptions::new("h.test");
        o.ca_file = Some("/x.pem".into());
        assert_eq!(TrustKey::of(&o).ca_file, None);
        o.verify_certs = true;
        assert_eq!(TrustKey::of(&o).ca_file.as_deref(), Some("/x.pem".as_ref()));
    }
}
