//! Optional TLS for the rendezvous (tonic over rustls with the ring provider): loading the
//! server's PEM certificate and key, and the client configuration a worker builds from the
//! CA the launcher hands it in `RSDEEP_TLS_CA` (contract: `docs/security.md`). Every error
//! names the file at fault. It lives beside the wire contract so that both binaries use it
//! without the worker linking the launcher.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

    #[test]
    fn cert_and_key_come_as_a_pair() {
        assert!(server_config(None, None).unwrap().is_none());
        let err = server_config(Some(Path::new("c.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--rendezvous_tls_key"), "{err}");
    }
}
