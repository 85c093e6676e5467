//! TLS and mutual TLS on the gRPC listener, with certificates made here:
//! who gets through the handshake, which identity a client certificate
//! names, and certificate rotation (on a file change and on SIGHUP) that
//! keeps the connections already open.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use outboxd::api::auth::{AuthConfig, IdentityConfig};
use outboxd::cli::client::{GatewayAccess, GatewayChannel};
use outboxd::config::Config;
use outboxd::proto;
use outboxd::proto::outbox_client::OutboxClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sha2::{Digest, Sha256};
use support::{
    Gateway, ServeProcess, Tansu, append_request, consume_until, eventually, immediate_token,
    keyed_event,
};

/// A certificate authority that signs certificates into a directory.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Authority {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `common_name`, also naming `alternative_names`
    /// (an IP address string becomes an IP SAN); `expired` makes one whose
    /// validity ended years ago.
    fn sign(
        &self,
        common_name: &str,
        alternative_names: &[&str],
        expired: bool,
    ) -> (String, String) {
        let names: Vec<String> = alternative_names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    // Written aside and renamed, as a certificate manager would, so that a
    // reload never reads half a file.
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    path
}

fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Files of a gateway with TLS: its certificate (for 127.0.0.1), its key,
/// and the CA that signed it.
struct ServerFiles {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl ServerFiles {
    fn new(authority: &Authority) -> ServerFiles {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = authority.sign("outboxd", &["localhost", "127.0.0.1"], false);
        let cert = write(dir.path(), "server.pem", &cert);
        let key = write(dir.path(), "server.key", &key);
        ServerFiles { dir, cert, key }
    }

    fn rotate_to(&self, authority: &Authority) {
        let (cert, key) = authority.sign("outboxd", &["localhost", "127.0.0.1"], false);
        write(self.dir.path(), "server.key", &key);
        write(self.dir.path(), "server.pem", &cert);
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        write(self.dir.path(), name, contents)
    }
}

/// What a client trusts and presents.
fn access(
    files: &ServerFiles,
    trusted: &Authority,
    client: Option<(&str, (String, String))>,
) -> GatewayAccess {
    let tls_ca = Some(files.file(
        &format!("ca-{}.pem", support::unique("trust")),
        &trusted.pem,
    ));
    let (tls_cert, tls_key) = match client {
        Some((name, (cert, key))) => (
            Some(files.file(&format!("{name}.pem"), &cert)),
            Some(files.file(&format!("{name}.key"), &key)),
        ),
        None => (None, None),
    };
    GatewayAccess {
        tls_ca,
        tls_cert,
        tls_key,
        ..GatewayAccess::default()
    }
}

/// Connects and appends one event; the error's text when either fails.
async fn try_append(
    address: &str,
    access: &GatewayAccess,
    producer: &str,
    topic: &str,
) -> Result<String, String> {
    let channel = tokio::time::timeout(Duration::from_secs(10), access.connect(address))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|error| format!("connect: {error:#}"))?;
    let mut client = OutboxClient::new(channel);
    let transaction = support::unique("tx");
    let response = client
        .append(append_request(
            immediate_token(producer, &transaction),
            vec![keyed_event(topic, "k", transaction.as_bytes())],
        ))
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(response.into_inner().event_ids.remove(0))
}

/// A test configuration serving TLS with `files`, read again every
/// `reload_interval`.
fn tls_config(brokers: &str, files: &ServerFiles, reload_interval: Duration) -> Config {
    let mut config = support::test_config(&support::sqlite_url(), brokers);
    config.tls.cert = Some(files.cert.clone());
    config.tls.key = Some(files.key.clone());
    config.tls.reload_interval = reload_interval;
    config
}

/// Waits until a client with `access` appends for `producer` through
/// `address`; the id of the event it stored.
async fn wait_serving(
    what: &str,
    address: &str,
    access: &GatewayAccess,
    producer: &str,
    topic: &str,
) -> String {
    eventually(what, Duration::from_secs(60), || async {
        try_append(address, access, producer, topic).await.ok()
    })
    .await
}

fn mutual_tls_config(
    store_url: &str,
    brokers: &str,
    files: &ServerFiles,
    client_ca: &Authority,
) -> Config {
    let mut config = support::test_config(store_url, brokers);
    config.tls.cert = Some(files.cert.clone());
    config.tls.key = Some(files.key.clone());
    config.tls.client_ca = Some(files.file("client-ca.pem", &client_ca.pem));
    config.tls.reload_interval = Duration::from_millis(200);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_valid_certificates_of_its_client_ca_and_names_their_identity() {
    let tansu = Tansu::shared();
    let topic = support::unique("orders");
    tansu.create_topic(&topic, 1).await;
    let servers = Authority::new("server CA");
    let clients = Authority::new("client CA");
    let stranger = Authority::new("another CA");
    let files = ServerFiles::new(&servers);
    let store_url = support::fresh_database().await;
    let mut config = mutual_tls_config(&store_url, &tansu.bootstrap, &files, &clients);
    config.auth = AuthConfig {
        identities: vec![
            IdentityConfig {
                name: "orders service".into(),
                client_certificate: "orders.internal".into(),
                producers: vec!["orders".into()],
                topics: vec!["orders_*".into()],
                ..IdentityConfig::default()
            },
            IdentityConfig {
                name: "billing service".into(),
                token_sha256: token_hash("billing-token"),
                producers: vec!["billing".into()],
                topics: vec!["orders_*".into()],
                ..IdentityConfig::default()
            },
        ],
    };
    let gateway = Gateway::start(config).await;
    let address = format!("https://{}", gateway.address);

    // The orders service's certificate, named by a DNS SAN.
    let orders = access(
        &files,
        &servers,
        Some((
            "orders",
            clients.sign("orders-1", &["orders.internal"], false),
        )),
    );
    let stored = wait_serving(
        "the TLS gateway to serve",
        &address,
        &orders,
        "orders",
        &topic,
    )
    .await;

    // Its identity is the certificate's: another producer is not its own.
    let refused = try_append(&address, &orders, "billing", &topic)
        .await
        .unwrap_err();
    assert!(
        refused.starts_with("PermissionDenied") && refused.contains("orders service"),
        "{refused}"
    );

    // A certificate of the client CA that names no identity authenticates
    // nothing; with a token, the token's identity acts.
    let unnamed = clients.sign("someone", &["someone.internal"], false);
    let mut with_token = access(&files, &servers, Some(("unnamed", unnamed.clone())));
    let refused = try_append(&address, &with_token, "orders", &topic)
        .await
        .unwrap_err();
    assert!(refused.starts_with("Unauthenticated"), "{refused}");
    with_token.token = Some("billing-token".into());
    let billed = try_append(&address, &with_token, "billing", &topic)
        .await
        .expect("the token's identity acts over mutual TLS");

    // Refused in the handshake: a certificate from another CA, an expired
    // one from the right CA, none at all, and plain gRPC.
    let other_ca = access(
        &files,
        &servers,
        Some((
            "stranger",
            stranger.sign("orders-1", &["orders.internal"], false),
        )),
    );
    let expired = access(
        &files,
        &servers,
        Some((
            "expired",
            clients.sign("orders-1", &["orders.internal"], true),
        )),
    );
    let mut none = access(&files, &servers, None);
    none.token = Some("billing-token".into());
    for (what, client) in [
        ("another CA", &other_ca),
        ("expired", &expired),
        ("none", &none),
    ] {
        let outcome = try_append(&address, client, "orders", &topic).await;
        assert!(
            outcome.is_err(),
            "a client with {what} certificate was let in"
        );
        let error = outcome.unwrap_err();
        assert!(
            !error.starts_with("Unauthenticated") && !error.starts_with("PermissionDenied"),
            "a client with {what} certificate reached the API: {error}"
        );
    }
    let plain = try_append(
        &format!("http://{}", gateway.address),
        &GatewayAccess::default(),
        "orders",
        &topic,
    )
    .await;
    assert!(plain.is_err(), "plain gRPC was served on a TLS listener");

    // Exactly the two appends that were let in reached Kafka.
    let mut client = OutboxClient::new(orders.connect(&address).await.unwrap());
    let listed = client
        .get_status(proto::GetStatusRequest {
            event_ids: vec![stored.clone(), billed.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // (The billing event is not the orders service's to read.)
    assert_eq!(listed.events.len(), 1);
    assert_eq!(listed.events[0].event_id, stored);
    let expected: HashSet<String> = HashSet::from([stored, billed]);
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 2, "only the admitted appends were published");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_used_for_new_connections_and_open_ones_stay() {
    let tansu = Tansu::shared();
    let topic = support::unique("orders");
    tansu.create_topic(&topic, 1).await;
    let first = Authority::new("first server CA");
    let second = Authority::new("second server CA");
    let files = ServerFiles::new(&first);
    let config = tls_config(&tansu.bootstrap, &files, Duration::from_millis(200));
    let gateway = Gateway::start(config).await;
    let address = format!("https://{}", gateway.address);
    let trusts_first = access(&files, &first, None);
    let trusts_second = access(&files, &second, None);
    wait_serving(
        "the TLS gateway to serve",
        &address,
        &trusts_first,
        "shop",
        &topic,
    )
    .await;
    assert!(
        try_append(&address, &trusts_second, "shop", &topic)
            .await
            .is_err()
    );

    // A connection made before the rotation, with a watch open on it.
    let channel: GatewayChannel = trusts_first.connect(&address).await.unwrap();
    let mut before = OutboxClient::new(channel);
    let mut watch = before
        .watch_status(proto::WatchStatusRequest {
            producer: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    files.rotate_to(&second);
    wait_serving(
        "the rotated certificate to be served",
        &address,
        &trusts_second,
        "shop",
        &topic,
    )
    .await;
    assert!(
        try_append(&address, &trusts_first, "shop", &topic)
            .await
            .is_err(),
        "a new connection still got the old certificate"
    );

    // The old connection goes on (a reconnect could not have verified the
    // new certificate), and its watch sees what is appended now.
    let transaction = support::unique("after-rotation");
    let id = before
        .append(append_request(
            immediate_token("shop", &transaction),
            vec![keyed_event(&topic, "k", b"after")],
        ))
        .await
        .expect("the connection opened before the rotation still serves")
        .into_inner()
        .event_ids
        .remove(0);
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = watch.next().await {
            let status = update.expect("the watch stays open").status.unwrap();
            if status.event_id == id && status.state == proto::EventState::Published as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "the watch opened before the rotation saw the event published"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_a_running_process() {
    let tansu = Tansu::shared();
    let topic = support::unique("orders");
    tansu.create_topic(&topic, 1).await;
    let first = Authority::new("first server CA");
    let second = Authority::new("second server CA");
    let files = ServerFiles::new(&first);
    // Only the signal can make it reload within the test.
    let config = tls_config(&tansu.bootstrap, &files, Duration::from_secs(3_600));
    let process = ServeProcess::spawn_on(&config, support::free_port());
    let address = format!("https://{}", process.address);
    let trusts_first = access(&files, &first, None);
    let trusts_second = access(&files, &second, None);
    wait_serving(
        "outboxd serve to accept TLS",
        &address,
        &trusts_first,
        "shop",
        &topic,
    )
    .await;

    files.rotate_to(&second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        try_append(&address, &trusts_second, "shop", &topic)
            .await
            .is_err(),
        "the certificate changed before SIGHUP"
    );
    process.hang_up();
    wait_serving(
        "the certificate to be reloaded on SIGHUP",
        &address,
        &trusts_second,
        "shop",
        &topic,
    )
    .await;
    process.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_that_do_not_load_are_named_at_start() {
    let servers = Authority::new("server CA");
    let files = ServerFiles::new(&servers);
    let mut config = support::test_config(&support::sqlite_url(), "127.0.0.1:1");
    config.tls.cert = Some(files.file("not-a-cert.pem", "garbage"));
    config.tls.key = Some(files.key.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = outboxd::server::run(config, listener, Default::default())
        .await
        .expect_err("a gateway started with a certificate file that holds none");
    // The error and its causes, as `outboxd serve` prints them.
    let error = format!("{:#}", anyhow::Error::from(error));
    assert!(error.contains("not-a-cert.pem"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_reaches_a_gateway_with_mutual_tls_and_its_certificate_identity() {
    let tansu = Tansu::shared();
    let servers = Authority::new("server CA");
    let clients = Authority::new("client CA");
    let files = ServerFiles::new(&servers);
    let mut config = mutual_tls_config(&support::sqlite_url(), &tansu.bootstrap, &files, &clients);
    config.auth = AuthConfig {
        identities: vec![
            IdentityConfig {
                name: "operator".into(),
                client_certificate: "operator".into(),
                admin: true,
                ..IdentityConfig::default()
            },
            IdentityConfig {
                name: "orders service".into(),
                client_certificate: "orders.internal".into(),
                producers: vec!["orders".into()],
                ..IdentityConfig::default()
            },
        ],
    };
    let gateway = Gateway::start(config).await;
    let ca = files.file("trusted-ca.pem", &servers.pem);
    let (cert, key) = clients.sign("operator", &[], false);
    let operator = (
        files.file("operator.pem", &cert),
        files.file("operator.key", &key),
    );
    let (cert, key) = clients.sign("orders-1", &["orders.internal"], false);
    let service = (
        files.file("service.pem", &cert),
        files.file("service.key", &key),
    );
    let admin = |client: Option<&(PathBuf, PathBuf)>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"));
        command
            .args(["admin", "--address"])
            .arg(format!("http://{}", gateway.address))
            .arg("--tls-ca")
            .arg(&ca);
        if let Some((cert, key)) = client {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        command.arg("leases").output().unwrap()
    };
    let listed = eventually(
        "the admin command to list leases",
        Duration::from_secs(30),
        || {
            let output = admin(Some(&operator));
            async move { output.status.success().then_some(output) }
        },
    )
    .await;
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("shard"),
        "{listed:?}"
    );

    let denied = admin(Some(&service));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && stderr.contains("admin role"),
        "a certificate identity without the admin role used OutboxAdmin: {stderr}"
    );
    let refused = admin(None);
    assert!(
        !refused.status.success(),
        "no client certificate, yet served"
    );
    gateway.stop().await;
}

#[test]
fn the_readmes_secured_configuration_is_valid() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Securing outboxd").expect("the section")..];
    let start = section.find("```toml\n").expect("its configuration") + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let config: Config = toml::from_str(text).expect("the README's configuration parses");
    config
        .validate()
        .expect("the README's configuration is valid");
    assert!(config.tls.mutual() && config.auth.identities.len() == 3);
}
