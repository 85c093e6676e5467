//! How the operator tools (`outboxd admin`, `outboxd bench`) reach a
//! gateway: its address, TLS (the CA that signed its certificate, and a
//! client certificate under mutual TLS) and a bearer token.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel to a gateway that sends the bearer token, if any, with every call.
pub type GatewayChannel = InterceptedService<Channel, BearerToken>;

/// Credentials for a secured gateway (all optional: a gateway without
/// `[tls]` and `[auth]` needs none).
#[derive(Args, Debug, Clone, Default)]
pub struct GatewayAccess {
    /// PEM file of the CA that signed the gateway's certificate: connect
    /// with TLS.
    #[arg(long, env = "OUTBOXD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this client's certificate, for a gateway with mutual TLS.
    #[arg(long, env = "OUTBOXD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, env = "OUTBOXD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the gateway's certificate must carry, when it is not the
    /// address's host.
    #[arg(long, env = "OUTBOXD_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Bearer token of an `[auth]` identity.
    #[arg(long, env = "OUTBOXD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl GatewayAccess {
    /// Whether the connection uses TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// An endpoint for `address` (`http://host:port`; `https://` when TLS
    /// is used, whichever of the two is written).
    pub fn endpoint(&self, address: &str) -> anyhow::Result<Endpoint> {
        if !self.uses_tls() {
            anyhow::ensure!(
                !address.starts_with("https://"),
                "an https:// address needs --tls-ca (the CA that signed the gateway's certificate)"
            );
            return Ok(Endpoint::from_shared(address.to_owned())?);
        }
        let address = match address.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => address.to_owned(),
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(path) = &self.tls_ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the CA certificate {}", path.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let cert = std::fs::read(cert)
                .with_context(|| format!("reading the client certificate {}", cert.display()))?;
            let key = std::fs::read(key)
                .with_context(|| format!("reading the client key {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(Endpoint::from_shared(address)?.tls_config(tls)?)
    }

    /// The token interceptor for calls on a channel.
    pub fn bearer(&self) -> anyhow::Result<BearerToken> {
        BearerToken::new(self.token.as_deref())
    }

    /// Connects to `address`.
    pub async fn connect(&self, address: &str) -> anyhow::Result<GatewayChannel> {
        let channel = self
            .endpoint(address)?
            .connect()
            .await
            .with_context(|| format!("connecting to {address}"))?;
        Ok(InterceptedService::new(channel, self.bearer()?))
    }
}

/// Adds `authorization: Bearer …` to every call when a token is given.
#[derive(Clone, Debug)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Sends `token`, when given; fails unless it is printable ASCII.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        Ok(BearerToken(
            token
                .map(|token| format!("Bearer {token}").parse())
                .transpose()
                .map_err(|_| anyhow::anyhow!("the token must be printable ASCII"))?,
        ))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A gateway's address and how to reach it.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port` (or `https://`).
    pub address: String,
    /// TLS and the token.
    pub access: GatewayAccess,
}

impl Target {
    /// Connects, with TLS and the token as configured.
    pub async fn connect(&self) -> anyhow::Result<GatewayChannel> {
        self.access.connect(&self.address).await
    }
}
