//! The rendezvous over TLS end to end: a server started with `start_server_tls` and the
//! certificate helpers of `rsdeep_proto::tls` serves clients that trust it and refuses
//! plaintext clients and clients trusting another certificate.

use std::path::{Path, PathBuf};

use rsdeep_proto::tls::{client_config, server_config};

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
    use super::{RendezvousState, WorldSpec, start_server_tls};
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
