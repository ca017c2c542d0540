//! Optional TLS for the rendezvous (tonic over rustls with the ring provider): loading the
//! server's PEM certificate and key, and the client configuration a worker builds from the
//! CA the launcher hands it in `RSDEEP_TLS_CA` (contract: `docs/security.md`). Every error
//! names the file at fault. No tch here: the worker reuses this through the `rsdeep` lib.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Environment variable carrying the PEM CA a worker trusts for the rendezvous.
pub const TLS_CA_ENV: &str = "RSDEEP_TLS_CA";
/// Environment variable overriding the name checked against the rendezvous certificate
/// (default: `MASTER_ADDR`).
pub const TLS_DOMAIN_ENV: &str = "RSDEEP_TLS_DOMAIN";

/// Why a TLS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The OS error is in the message, not a `source` (chains would print it twice).
    #[error("cannot read the {what} {}: {cause}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the {what} {} holds no PEM block '-----BEGIN {marker}'", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        marker: &'static str,
    },
    #[error(
        "TLS needs both --rendezvous_tls_cert and --rendezvous_tls_key (only the {given} was given)"
    )]
    HalfPair { given: &'static str },
}

/// Reads a PEM file and checks it holds a block whose header contains `marker`.
fn read_pem(path: &Path, what: &'static str, marker: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Unreadable {
        what,
        path: path.to_path_buf(),
        cause: source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(marker));
    if !has_block {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
            marker,
        });
    }
    Ok(bytes)
}

/// The server's TLS identity from `--rendezvous_tls_cert` / `--rendezvous_tls_key`;
/// `None` when neither is given.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, TlsError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::HalfPair {
            given: "certificate",
        }),
        (None, Some(_)) => Err(TlsError::HalfPair { given: "key" }),
        (Some(cert), Some(key)) => {
            let cert_pem = read_pem(cert, "TLS certificate", "CERTIFICATE")?;
            let key_pem = read_pem(key, "TLS private key", "PRIVATE KEY")?;
            let identity = Identity::from_pem(cert_pem, key_pem);
            Ok(Some(ServerTlsConfig::new().identity(identity)))
        }
    }
}

/// The client side: trust the PEM CA at `ca` and check the server's name `domain`.
pub fn client_config(ca: &Path, domain: &str) -> Result<ClientTlsConfig, TlsError> {
    let pem = read_pem(ca, "TLS CA certificate", "CERTIFICATE")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.pem");
        let err = server_config(Some(&missing), Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TLS certificate") && err.contains("absent.pem"),
            "{err}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = client_config(&junk, "localhost").unwrap_err().to_string();
        assert!(
            err.contains("junk.pem") && err.contains("BEGIN CERTIFICATE"),
            "{err}"
        );
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAA==\n").unwrap();
        let err = server_config(Some(&cert), Some(&junk))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("private key") && err.contains("junk.pem"),
            "{err}"
        );
    }

    /// A self-signed certificate for 127.0.0.1/localhost written as cert.pem/key.pem.
    fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let pair = rcgen::generate_simple_self_signed(names).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[tokio::test]
    async fn tls_rendezvous_serves_trusting_clients_and_refuses_plaintext_and_strangers() {
        use crate::rendezvous::{RendezvousState, WorldSpec, start_server_tls};
        use rsdeep_proto::TOKEN_METADATA_KEY;
        use rsdeep_proto::v1::{SetRequest, rendezvous_client::RendezvousClient};
        use std::sync::Arc;
        use std::time::Duration;
        use tonic::transport::Endpoint;

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let spec = WorldSpec {
            job_id: "job".into(),
            nodes: vec![("localhost".into(), 1)],
            join_timeout: Duration::from_secs(5),
        };
        let state = Arc::new(RendezvousState::new(spec));
        let tls = server_config(Some(&cert), Some(&key)).unwrap();
        let server = start_server_tls(state.clone(), "tok".into(), ([127, 0, 0, 1], 0).into(), tls)
            .await
            .unwrap();
        let set = |key: &str| {
            let mut request = tonic::Request::new(SetRequest {
                job_id: "job".into(),
                key: key.into(),
                value: vec![1, 2, 3],
            });
            let token = "tok".parse().unwrap();
            request.metadata_mut().insert(TOKEN_METADATA_KEY, token);
            request
        };
        let https = format!("https://{}", server.addr);
        let trusted = Endpoint::from_shared(https.clone())
            .unwrap()
            .tls_config(client_config(&cert, "127.0.0.1").unwrap())
            .unwrap();
        let mut client = RendezvousClient::new(trusted.connect().await.unwrap());
        client.set(set("over-tls")).await.unwrap();
        assert_eq!(
            state
                .get("over-tls", Duration::from_millis(10))
                .await
                .unwrap(),
            [1, 2, 3]
        );

        // Plaintext HTTP/2 against the TLS port: the handshake fails, nothing is stored.
        let plain = async {
            let mut c = RendezvousClient::connect(format!("http://{}", server.addr)).await?;
            c.set(set("plaintext")).await.map_err(anyhow::Error::from)?;
            anyhow::Ok(())
        };
        let refused = tokio::time::timeout(Duration::from_secs(10), plain).await;
        assert!(
            matches!(refused, Ok(Err(_))),
            "plaintext client was not refused"
        );
        // A client trusting another certificate refuses the server.
        let other = tempfile::tempdir().unwrap();
        let (stranger, _) = self_signed(other.path());
        let distrusting = Endpoint::from_shared(https)
            .unwrap()
            .tls_config(client_config(&stranger, "127.0.0.1").unwrap())
            .unwrap();
        assert!(distrusting.connect().await.is_err());
        assert!(
            state
                .get("plaintext", Duration::from_millis(10))
                .await
                .is_err()
        );
    }

    #[test]
    fn cert_and_key_come_as_a_pair() {
        assert!(server_config(None, None).unwrap().is_none());
        let err = server_config(Some(Path::new("c.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--rendezvous_tls_key"), "{err}");
    }
}
