//! Connecting to the broker with the configured credentials and TLS, retrying at start-up
//! within a time budget so a worker started before its broker comes up on its own.

use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions};
use backon::{ExponentialBuilder, Retryable};

use crate::config::Config;

/// Why the broker could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A credential or TLS file could not be used.
    #[error("broker credentials: {0}")]
    Credentials(String),
    /// No broker answered within the budget.
    #[error("broker unreachable at {urls} after {secs}s: {last}")]
    Unreachable {
        /// The URLs tried.
        urls: String,
        /// The budget.
        secs: u64,
        /// The last error.
        last: String,
    },
}

async fn options(cfg: &Config, name: &str) -> Result<ConnectOptions, ConnectError> {
    let mut o = if let Some(creds) = &cfg.nats_creds {
        ConnectOptions::with_credentials_file(creds.clone())
            .await
            .map_err(|e| ConnectError::Credentials(format!("{}: {e}", creds.display())))?
    } else if let Some(nkey) = &cfg.nats_nkey {
        let seed = std::fs::read_to_string(nkey)
            .map_err(|e| ConnectError::Credentials(format!("{}: {e}", nkey.display())))?;
        ConnectOptions::with_nkey(seed.trim().to_owned())
    } else if let Some(token) = &cfg.nats_token {
        ConnectOptions::with_token(token.clone())
    } else if let (Some(u), Some(p)) = (&cfg.nats_user, &cfg.nats_password) {
        ConnectOptions::with_user_and_password(u.clone(), p.clone())
    } else {
        ConnectOptions::new()
    };
    if let Some(ca) = &cfg.nats_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.nats_cert, &cfg.nats_key) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(o.name(name)
        // Replies, PubAcks and pulled messages arrive under this prefix; the broker may allow
        // this client no other inbox (deploy/nats/permissions.conf).
        .custom_inbox_prefix(&cfg.inbox_prefix)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None))
}

/// The oldest nats-server whose JetStream API ignores a PubAck aimed at it.
pub const MIN_SAFE_SERVER: (u32, u32) = (2, 12);

/// A warning when the broker's version (`2.11.11`) is older than [`MIN_SAFE_SERVER`].
///
/// Up to 2.11 (measured: 2.9.10, 2.10.25, 2.11.11; 2.12.0 and later are not affected) the
/// server delivers a stream's PubAck to whatever reply subject the publisher named, and the
/// JetStream API acts on it: a client allowed to publish one command can purge the pending
/// commands of the stream by naming `$JS.API.STREAM.PURGE.<stream>` as its reply subject. No
/// permission can forbid a reply subject, so the remedy is the server version.
pub fn server_version_warning(version: &str) -> Option<String> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        return Some(format!(
            "nats-server version {version:?} not understood; 2.12 or later is needed so that \
             no publisher can purge the stream through its PubAck"
        ));
    };
    ((major, minor) < MIN_SAFE_SERVER).then(|| {
        format!(
            "nats-server {version} lets any publisher purge the stream's pending commands by \
             aiming its PubAck at the JetStream API; upgrade the broker to 2.12 or later"
        )
    })
}

/// Connects, retrying (100 ms doubling to 2 s, [`backon`]) until `cfg.connect_timeout` has
/// passed. A refused credential or a TLS problem is not retried.
pub async fn connect(cfg: &Config, name: &str) -> Result<Client, ConnectError> {
    let urls = cfg.nats_urls.join(",");
    let started = Instant::now();
    // The first failure is reported (no retry_on_initial_connect), so this loop owns the
    // start-up budget; after that the client reconnects on its own, forever.
    let attempt = || async {
        let opts = options(cfg, name).await?;
        opts.connect(cfg.nats_urls.as_slice()).await.map_err(|e| {
            let last = e.to_string();
            // Retrying cannot fix a refused credential or a certificate problem.
            if matches!(
                e.kind(),
                async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Tls
            ) {
                ConnectError::Credentials(last)
            } else {
                ConnectError::Unreachable {
                    urls: urls.clone(),
                    secs: cfg.connect_timeout.as_secs(),
                    last,
                }
            }
        })
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .without_max_times(),
        )
        .when(|e| matches!(e, ConnectError::Unreachable { .. }))
        // Stop once the next attempt would start after the budget.
        .adjust(|_, delay| delay.filter(|d| started.elapsed() + *d <= cfg.connect_timeout))
        .notify(|e, _| tracing::warn!(%urls, error = %e, "broker not reachable yet; retrying"))
        .await
}

#[cfg(test)]
mod tests {
    use super::server_version_warning;

    #[test]
    fn brokers_before_2_12_are_warned_about() {
        for old in ["2.9.10", "2.10.25", "2.11.11", "v2.11.0"] {
            assert!(server_version_warning(old).is_some(), "{old}");
        }
        for new in ["2.12.0", "2.12.8", "2.15.1", "3.0.0", "2.14.0-beta.1"] {
            assert_eq!(server_version_warning(new), None, "{new}");
        }
        assert!(server_version_warning("unknown").is_some());
    }
}
