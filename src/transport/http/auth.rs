//! Who may do what over HTTP: credentials (bearer tokens or basic auth) from the
//! configuration, each mapped to roles named as in deploy/nats (engine, advisor, reader,
//! operator), and what each role may call.
//!
//! Secrets are compared as SHA-256 digests in constant time, so a configuration may hold the
//! digest instead of the secret, and timing does not tell how much of a guess was right.

use std::collections::BTreeSet;

use base64::Engine as _;

use crate::domain::ids::Actor;
use sha2::{Digest, Sha256};

/// A role, as in deploy/nats/permissions.conf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Publishes run records (create).
    Engine,
    /// Attaches advisories.
    Advisor,
    /// Reads: list, get, verify, history, diff, outputs, the web view.
    Reader,
    /// Reads, corrects metadata, deletes.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Engine, Role::Advisor, Role::Reader, Role::Operator];

    /// Its name in configs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Advisor => "advisor",
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (engine, advisor, reader, operator)"))
    }
}

/// What a request needs: one of these roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads (reader or operator).
    Read,
    /// A create (engine).
    Create,
    /// An advisory (advisor).
    Advise,
    /// A metadata patch or a delete (operator).
    Operate,
}

impl Access {
    /// The roles that grant it.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Access::Read => &[Role::Reader, Role::Operator],
            Access::Create => &[Role::Engine],
            Access::Advise => &[Role::Advisor],
            Access::Operate => &[Role::Operator],
        }
    }
}

/// How a credential proves itself.
#[derive(Clone)]
enum Secret {
    /// `Authorization: Bearer <token>`; the token's SHA-256.
    Bearer([u8; 32]),
    /// `Authorization: Basic`; the user and the password's SHA-256.
    Basic { user: String, password: [u8; 32] },
}

/// One configured credential.
#[derive(Clone)]
pub struct Credential {
    name: Actor,
    secret: Secret,
    roles: BTreeSet<Role>,
}

impl std::fmt::Debug for Credential {
    // Never prints the secret (not even its digest): configs get logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// A credential as written in the configuration file (`[[http.credentials]]`).
#[derive(serde::Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// A name for logs (never the secret).
    pub name: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Bearer token, in clear.
    pub token: Option<String>,
    /// Bearer token, as the hex SHA-256 of the token.
    pub token_sha256: Option<String>,
    /// Basic auth user.
    pub user: Option<String>,
    /// Basic auth password, in clear.
    pub password: Option<String>,
    /// Basic auth password, as the hex SHA-256 of the password.
    pub password_sha256: Option<String>,
}

impl std::fmt::Debug for CredentialConfig {
    // Never prints secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn parse_digest(what: &str, hex_text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out)
        .map_err(|_| format!("{what} must be 64 hex digits (a SHA-256)"))?;
    Ok(out)
}

impl CredentialConfig {
    /// Parses it; the error names the credential and the field.
    pub fn parse(&self) -> Result<Credential, String> {
        let name = self.name.trim();
        let at = |m: String| format!("http.credentials {name:?}: {m}");
        if name.is_empty() {
            return Err("http.credentials: every credential needs a name".into());
        }
        let roles = self
            .roles
            .iter()
            .map(|r| Role::parse(r))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(at)?;
        if roles.is_empty() {
            return Err(at("roles: give at least one".into()));
        }
        let secret = match (
            &self.token,
            &self.token_sha256,
            &self.user,
            &self.password,
            &self.password_sha256,
        ) {
            (Some(t), None, None, None, None) if t.len() >= 16 => Secret::Bearer(digest(t)),
            (Some(_), None, None, None, None) => {
                return Err(at("token: use at least 16 characters".into()));
            }
            (None, Some(h), None, None, None) => {
                Secret::Bearer(parse_digest("token_sha256", h).map_err(at)?)
            }
            (None, None, Some(u), Some(p), None) if !u.is_empty() && !u.contains(':') => {
                if p.len() < 12 {
                    return Err(at("password: use at least 12 characters".into()));
                }
                Secret::Basic {
                    user: u.clone(),
                    password: digest(p),
                }
            }
            (None, None, Some(u), None, Some(h)) if !u.is_empty() && !u.contains(':') => {
                Secret::Basic {
                    user: u.clone(),
                    password: parse_digest("password_sha256", h).map_err(at)?,
                }
            }
            _ => {
                return Err(at(
                    "give either token (or token_sha256), or user with password (or \
                     password_sha256); a user name may not contain ':'"
                        .into(),
                ));
            }
        };
        let name = Actor::parse(name).map_err(|e| {
            format!("http.credentials {name:?}: name: {e} (it is the actor of its commands)")
        })?;
        Ok(Credential {
            name,
            secret,
            roles,
        })
    }
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No credentials are configured (loopback only): everyone may do everything.
    Open,
    /// A configured credential.
    Known {
        /// Its name, the actor of its commands.
        name: Actor,
        /// Its roles.
        roles: BTreeSet<Role>,
    },
}

impl Caller {
    /// Its name in logs and as the actor of commands.
    pub fn name(&self) -> Option<&str> {
        self.actor().map(|a| a.as_str())
    }

    /// The actor its commands carry (`Rmos-Actor`), kept in their revisions.
    pub fn actor(&self) -> Option<&Actor> {
        match self {
            Caller::Open => None,
            Caller::Known { name, .. } => Some(name),
        }
    }

    /// Whether it may do `access`.
    pub fn may(&self, access: Access) -> bool {
        match self {
            Caller::Open => true,
            Caller::Known { roles, .. } => access.roles().iter().any(|r| roles.contains(r)),
        }
    }
}

/// Why a request is refused before any handler runs.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No or unknown credentials (401).
    Unauthenticated(String),
    /// Known, without the role (403).
    Forbidden(String),
}

/// The configured credentials.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    credentials: Vec<Credential>,
}

impl Auth {
    /// Over `credentials`; none means open access (allowed on loopback only, see
    /// [`Auth::check_bind`]).
    pub fn new(credentials: Vec<Credential>) -> Self {
        Self { credentials }
    }

    /// Whether any credential is configured.
    pub fn enabled(&self) -> bool {
        !self.credentials.is_empty()
    }

    /// Refuses an address other than loopback when no credential is configured.
    pub fn check_bind(&self, addr: &std::net::SocketAddr) -> Result<(), String> {
        if self.enabled() || addr.ip().is_loopback() {
            Ok(())
        } else {
            Err(format!(
                "http_addr {addr} is not a loopback address: configure [[http.credentials]] \
                 (see the README) or bind to 127.0.0.1"
            ))
        }
    }

    /// Who sent a request with this `Authorization` header value, if anyone.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        let Some(value) = authorization else {
            return Err(AuthError::Unauthenticated(
                "authentication required: send Authorization: Bearer <token> or Basic".into(),
            ));
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        let found = if scheme.eq_ignore_ascii_case("bearer") {
            let d = digest(rest);
            self.credentials
                .iter()
                .find(|c| matches!(&c.secret, Secret::Bearer(t) if same(t, &d)))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    AuthError::Unauthenticated("basic credentials are not base64 UTF-8".into())
                })?;
            let (user, password) = decoded.split_once(':').unwrap_or((decoded.as_str(), ""));
            let d = digest(password);
            // Every credential is compared (a fold, never stopping early), so timing does not
            // tell which users exist.
            self.credentials.iter().fold(None, |found, c| {
                let hit = matches!(&c.secret, Secret::Basic { user: u, password: p }
                    if same(p, &d) & (u == user));
                if hit { Some(c) } else { found }
            })
        } else {
            return Err(AuthError::Unauthenticated(format!(
                "authorization scheme {scheme:?} not supported: use Bearer or Basic"
            )));
        };
        match found {
            Some(c) => Ok(Caller::Known {
                name: c.name.clone(),
                roles: c.roles.clone(),
            }),
            None => Err(AuthError::Unauthenticated(
                "credentials not recognised".into(),
            )),
        }
    }

    /// Authenticates and checks `access`.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        access: Access,
    ) -> Result<Caller, AuthError> {
        let caller = self.authenticate(authorization)?;
        if caller.may(access) {
            Ok(caller)
        } else {
            let roles: Vec<&str> = access.roles().iter().map(|r| r.as_str()).collect();
            Err(AuthError::Forbidden(format!(
                "credential {:?} lacks the role this needs ({})",
                caller.name().unwrap_or(""),
                roles.join(" or ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let reader = CredentialConfig {
            name: "dash".into(),
            roles: vec!["reader".into()],
            token: Some("reader-token-0123456789".into()),
            ..Default::default()
        };
        let ops = CredentialConfig {
            name: "ops".into(),
            roles: vec!["operator".into()],
            user: Some("ops".into()),
            password_sha256: Some(hex::encode(digest("correct horse battery"))),
            ..Default::default()
        };
        Auth::new(vec![reader.parse().unwrap(), ops.parse().unwrap()])
    }

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn roles_and_schemes() {
        let a = auth();
        let c = a
            .authorize(Some("Bearer reader-token-0123456789"), Access::Read)
            .unwrap();
        assert_eq!(c.name(), Some("dash"));
        assert!(matches!(
            a.authorize(Some("Bearer reader-token-0123456789"), Access::Operate),
            Err(AuthError::Forbidden(_))
        ));
        assert!(
            a.authorize(
                Some(&basic("ops", "correct horse battery")),
                Access::Operate
            )
            .is_ok()
        );
        assert!(
            a.authorize(Some(&basic("ops", "correct horse battery")), Access::Read)
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Digest x"),
            Some("Basic !!!"),
            Some(basic("ops", "wrong").as_str()),
            Some(basic("dash", "reader-token-0123456789").as_str()),
        ] {
            assert!(
                matches!(
                    a.authorize(bad, Access::Read),
                    Err(AuthError::Unauthenticated(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn open_only_on_loopback() {
        let open = Auth::default();
        assert_eq!(open.authenticate(None), Ok(Caller::Open));
        assert!(open.check_bind(&"127.0.0.1:8000".parse().unwrap()).is_ok());
        assert!(open.check_bind(&"[::1]:8000".parse().unwrap()).is_ok());
        assert!(open.check_bind(&"0.0.0.0:8000".parse().unwrap()).is_err());
        assert!(auth().check_bind(&"0.0.0.0:8000".parse().unwrap()).is_ok());
    }

    #[test]
    fn bad_credentials_named() {
        let e = CredentialConfig {
            name: "x".into(),
            roles: vec!["admin".into()],
            token: Some("0123456789abcdef".into()),
            ..Default::default()
        }
        .parse()
        .unwrap_err();
        assert!(e.contains("\"x\"") && e.contains("admin"), "{e}");
        let e = CredentialConfig {
            name: "x".into(),
            roles: vec!["reader".into()],
            token: Some("short".into()),
            ..Default::default()
        }
        .parse()
        .unwrap_err();
        assert!(e.contains("16"), "{e}");
        let printed = format!("{:?}", auth());
        assert!(!printed.contains("reader-token"), "{printed}");
    }
}
