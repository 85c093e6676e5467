//! Who is calling, and what they may do: bearer tokens (kept as SHA-256
//! hashes in the configuration) and, under mutual TLS, client certificates
//! name identities; each identity may act for
//! the producer namespaces and write to the topics its patterns allow, and
//! the admin role may use `OutboxAdmin`. With no identity configured the
//! gateway is open, as before authentication existed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;

use super::ApiError;
use crate::domain::Limits;
use crate::tls::Peer;

/// Authentication settings (`[auth]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Who may call; none: every caller may do everything.
    pub identities: Vec<IdentityConfig>,
}

/// One caller (`[[auth.identities]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// For logs and error messages.
    pub name: String,
    /// Hex SHA-256 of the bearer token (`printf %s "$TOKEN" | sha256sum`);
    /// empty when the identity authenticates by certificate only.
    pub token_sha256: String,
    /// A name of its client certificate (under mutual TLS): the subject's
    /// common name, or a DNS or URI subject alternative name. Empty when
    /// the identity authenticates by bearer token only.
    pub client_certificate: String,
    /// Producer namespaces it may act for: exact names, or a prefix ending
    /// in `*` (`billing-*`); `*` is every producer.
    pub producers: Vec<String>,
    /// Topics it may append to, in the same pattern form.
    pub topics: Vec<String>,
    /// May use `OutboxAdmin` (dead letters, redrive, pause, leases…).
    pub admin: bool,
}

impl AuthConfig {
    /// Why this configuration may not be used, if it may not.
    pub fn validate(&self) -> Result<(), String> {
        let mut hashes = std::collections::HashSet::new();
        let mut certificates = std::collections::HashSet::new();
        for identity in &self.identities {
            let name = &identity.name;
            if name.is_empty() {
                return Err("auth.identities: every identity needs a name".into());
            }
            if identity.token_sha256.is_empty() && identity.client_certificate.is_empty() {
                return Err(format!(
                    "auth.identities {name:?}: needs a token_sha256 or a client_certificate"
                ));
            }
            if !identity.client_certificate.is_empty()
                && !certificates.insert(identity.client_certificate.as_str())
            {
                return Err(format!(
                    "auth.identities {name:?}: another identity has the same client_certificate"
                ));
            }
            for pattern in identity.producers.iter().chain(&identity.topics) {
                if pattern.is_empty() || pattern.strip_suffix('*').unwrap_or(pattern).contains('*')
                {
                    return Err(format!(
                        "auth.identities {name:?}: pattern {pattern:?} may only end in '*'"
                    ));
                }
            }
            if identity.token_sha256.is_empty() {
                continue;
            }
            if decode_hash(&identity.token_sha256).is_none() {
                return Err(format!(
                    "auth.identities {name:?}: token_sha256 must be 64 hex digits (a SHA-256)"
                ));
            }
            if !hashes.insert(identity.token_sha256.to_ascii_lowercase()) {
                return Err(format!(
                    "auth.identities {name:?}: another identity has the same token"
                ));
            }
        }
        Ok(())
    }
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// A name or a prefix ending in `*`.
#[derive(Debug, Clone)]
struct Pattern(String);

impl Pattern {
    fn matches(&self, value: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => self.0 == value,
        }
    }
}

/// A configured caller.
#[derive(Debug)]
pub struct Identity {
    /// The configured name, for logs and error messages.
    pub name: String,
    /// None: authenticates by certificate only.
    token_hash: Option<[u8; 32]>,
    client_certificate: String,
    producers: Vec<Pattern>,
    topics: Vec<Pattern>,
    admin: bool,
    /// Places for its open streams (`limits.max_streams_per_identity`).
    streams: Arc<Semaphore>,
    /// Its request rate (`limits.requests_per_second_per_identity`), when
    /// limited. A std mutex: held for a few arithmetic operations only.
    bucket: Option<Mutex<TokenBucket>>,
}

/// A token bucket: `rate` tokens a second, holding at most `rate` (one
/// second's worth, so a burst is allowed up to that).
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        TokenBucket {
            tokens: f64::from(rate),
            rate: f64::from(rate),
            refilled: Instant::now(),
        }
    }

    /// Takes a token, or tells how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
        // (A hair under one counts: a caller that waited the delay it was
        // given must not be turned away by rounding.)
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Finds the identity of a request.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    identities: Arc<Vec<Identity>>,
}

impl Authenticator {
    /// The identities of `config`, each with its own stream places and request
    /// rate from `limits`; `config` is assumed validated
    /// ([`AuthConfig::validate`]).
    pub fn new(config: &AuthConfig, limits: &Limits) -> Self {
        let identities = config
            .identities
            .iter()
            .map(|identity| Identity {
                name: identity.name.clone(),
                token_hash: decode_hash(&identity.token_sha256),
                client_certificate: identity.client_certificate.clone(),
                producers: identity.producers.iter().cloned().map(Pattern).collect(),
                topics: identity.topics.iter().cloned().map(Pattern).collect(),
                admin: identity.admin,
                streams: Arc::new(Semaphore::new(limits.max_streams_per_identity)),
                bucket: (limits.requests_per_second_per_identity > 0)
                    .then(|| Mutex::new(TokenBucket::new(limits.requests_per_second_per_identity))),
            })
            .collect();
        Authenticator {
            identities: Arc::new(identities),
        }
    }

    /// Whether callers must authenticate.
    pub fn is_open(&self) -> bool {
        self.identities.is_empty()
    }

    /// What the caller of a request may do: UNAUTHENTICATED when
    /// credentials are needed and missing or unknown, RESOURCE_EXHAUSTED
    /// when the identity is over its request rate.
    pub fn access<T>(&self, request: &tonic::Request<T>) -> Result<Access, ApiError> {
        self.access_of(request.metadata(), request.extensions().get::<Peer>())
    }

    /// [`Self::access`] from a request's parts. A bearer token, when sent,
    /// decides; otherwise the connection's client certificate does.
    pub fn access_of(
        &self,
        metadata: &MetadataMap,
        peer: Option<&Peer>,
    ) -> Result<Access, ApiError> {
        if self.is_open() {
            return Ok(Access::Open);
        }
        let index = match metadata.get("authorization") {
            Some(value) => {
                self.by_token(value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")))?
            }
            None => {
                let names = peer
                    .map(|peer| &peer.certificate_names[..])
                    .unwrap_or_default();
                self.by_certificate(names).ok_or_else(|| {
                    ApiError::Unauthenticated(if names.is_empty() {
                        "a bearer token (authorization: Bearer …) or a client certificate of a configured identity is required".into()
                    } else {
                        format!("no identity has the client certificate {:?}", names[0])
                    })
                })?
            }
        };
        let identity = &self.identities[index];
        if let Some(bucket) = &identity.bucket
            && let Err(retry_after) = bucket.lock().expect("rate lock").take(Instant::now())
        {
            return Err(ApiError::ResourceExhausted {
                message: format!(
                    "identity {:?} is over its request rate (limits.requests_per_second_per_identity)",
                    identity.name
                ),
                retry_after,
            });
        }
        Ok(Access::Identity(IdentityRef {
            identities: self.identities.clone(),
            index,
        }))
    }
}

impl Authenticator {
    fn by_token(&self, token: Option<&str>) -> Result<usize, ApiError> {
        let token = token.ok_or_else(|| {
            ApiError::Unauthenticated("the authorization header must be \"Bearer <token>\"".into())
        })?;
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // Every stored hash is compared in full, so that the time taken
        // tells nothing about which one (if any) came close.
        let mut found = None;
        for (index, identity) in self.identities.iter().enumerate() {
            if let Some(stored) = &identity.token_hash
                && constant_time_eq(stored, &hash)
            {
                found = Some(index);
            }
        }
        found.ok_or_else(|| ApiError::Unauthenticated("unknown bearer token".into()))
    }

    /// The identity named by the first of the certificate's names that any
    /// identity has (its common name first, then its alternative names).
    fn by_certificate(&self, names: &[String]) -> Option<usize> {
        names.iter().find_map(|name| {
            self.identities
                .iter()
                .position(|identity| identity.client_certificate == *name)
        })
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// An authenticated identity, shared with the authenticator.
#[derive(Debug, Clone)]
pub struct IdentityRef {
    identities: Arc<Vec<Identity>>,
    index: usize,
}

impl std::ops::Deref for IdentityRef {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.identities[self.index]
    }
}

/// What one request's caller may do.
#[derive(Debug, Clone)]
pub enum Access {
    /// No identities are configured: everything.
    Open,
    /// The caller authenticated as this identity: what its patterns and role
    /// allow.
    Identity(IdentityRef),
}

impl Access {
    /// Whether the caller may act for (append, resolve, read, watch) `producer`.
    pub fn allows_producer(&self, producer: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Identity(identity) => identity.producers.iter().any(|p| p.matches(producer)),
        }
    }

    /// PERMISSION_DENIED naming the producer, unless the caller may act for it.
    pub fn check_producer(&self, producer: &str) -> Result<(), ApiError> {
        match self {
            _ if self.allows_producer(producer) => Ok(()),
            Access::Identity(identity) => Err(ApiError::PermissionDenied(format!(
                "identity {:?} may not act for producer {producer:?}",
                identity.name
            ))),
            Access::Open => Ok(()),
        }
    }

    /// PERMISSION_DENIED naming the topic, unless the caller may write to it.
    pub fn check_topic(&self, topic: &str) -> Result<(), ApiError> {
        match self {
            Access::Open => Ok(()),
            Access::Identity(identity) if identity.topics.iter().any(|p| p.matches(topic)) => {
                Ok(())
            }
            Access::Identity(identity) => Err(ApiError::PermissionDenied(format!(
                "identity {:?} may not append to topic {topic:?}",
                identity.name
            ))),
        }
    }

    /// A place for one more open stream (AppendStream, WatchStatus) of this
    /// caller, held for the stream's life; RESOURCE_EXHAUSTED when its
    /// streams are at `limits.max_streams_per_identity`.
    pub fn open_stream(&self) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        match self {
            Access::Open => Ok(None),
            Access::Identity(identity) => identity
                .streams
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| ApiError::ResourceExhausted {
                    message: format!(
                        "identity {:?} has too many open streams (limits.max_streams_per_identity)",
                        identity.name
                    ),
                    retry_after: Duration::from_secs(1),
                }),
        }
    }

    /// PERMISSION_DENIED unless the caller has the admin role.
    pub fn check_admin(&self) -> Result<(), ApiError> {
        match self {
            Access::Open => Ok(()),
            Access::Identity(identity) if identity.admin => Ok(()),
            Access::Identity(identity) => Err(ApiError::PermissionDenied(format!(
                "identity {:?} may not use OutboxAdmin (it has no admin role)",
                identity.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn config() -> AuthConfig {
        AuthConfig {
            identities: vec![IdentityConfig {
                name: "shop".into(),
                token_sha256: hash("secret"),
                producers: vec!["shop".into(), "shop-*".into()],
                topics: vec!["orders.*".into()],
                admin: false,
                ..IdentityConfig::default()
            }],
        }
    }

    fn with_token(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        metadata
    }

    #[test]
    fn a_known_token_names_its_identity_and_its_rights() {
        let auth = Authenticator::new(&config(), &Limits::default());
        let access = auth.access_of(&with_token("secret"), None).unwrap();
        assert!(access.allows_producer("shop") && access.allows_producer("shop-eu"));
        assert!(!access.allows_producer("shopping") && !access.allows_producer("billing"));
        assert!(access.check_topic("orders.created").is_ok());
        assert!(access.check_topic("invoices").is_err());
        assert!(access.check_admin().is_err());
    }

    #[test]
    fn missing_and_unknown_tokens_are_refused() {
        let auth = Authenticator::new(&config(), &Limits::default());
        assert!(matches!(
            auth.access_of(&MetadataMap::new(), None),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.access_of(&with_token("guess"), None),
            Err(ApiError::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_token_bucket_allows_its_rate_and_says_when_to_come_back() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2);
        bucket.refilled = start;
        assert!(bucket.take(start).is_ok() && bucket.take(start).is_ok());
        let wait = bucket.take(start).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(bucket.take(start + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn no_identities_is_open() {
        let auth = Authenticator::new(&AuthConfig::default(), &Limits::default());
        let access = auth.access_of(&MetadataMap::new(), None).unwrap();
        assert!(access.allows_producer("anyone") && access.check_admin().is_ok());
    }

    #[test]
    fn bad_configurations_are_named() {
        let mut bad = config();
        bad.identities[0].token_sha256 = "abc".into();
        assert!(bad.validate().unwrap_err().contains("64 hex digits"));
        let mut bad = config();
        bad.identities[0].topics = vec!["or*ders".into()];
        assert!(bad.validate().unwrap_err().contains("may only end in '*'"));
        let mut accented = config();
        accented.identities[0].producers = vec!["café".into(), "café-*".into()];
        accented
            .validate()
            .expect("a pattern may end in any character");
        let mut twice = config();
        twice.identities.push(twice.identities[0].clone());
        twice.identities[1].name = "again".into();
        assert!(twice.validate().unwrap_err().contains("same token"));
    }
}
