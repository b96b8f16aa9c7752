//! Certificates for the harness's TLS servers, made at test time with rcgen (no `openssl`
//! binary, nothing checked in, nothing that expires while a test runs).

use std::io;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test certificate authority and certificates it signed, all PEM.
///
/// * the server certificate names `127.0.0.1` and `localhost`, and is also good for client
///   authentication (cluster nodes present it to each other on their TLS bus);
/// * the client certificate is for mutual TLS (`tls-auth-clients yes`);
/// * [`other_ca_pem`](Self::other_ca_pem) is an unrelated CA, which must not be trusted for
///   the server's certificate.
///
/// One set per test process: [`test_certificates`].
#[derive(Debug)]
pub struct TestCertificates {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    other_ca_pem: String,
    /// A server certificate for `redis.invalid` only (not the address tests connect to).
    misnamed_cert_pem: String,
    misnamed_key_pem: String,
}

/// The process's [`TestCertificates`], made on first use.
///
/// # Panics
///
/// When rcgen cannot make a certificate (it does not fail for these inputs).
pub fn test_certificates() -> &'static TestCertificates {
    static CERTS: OnceLock<TestCertificates> = OnceLock::new();
    CERTS.get_or_init(|| TestCertificates::generate().expect("generate test certificates"))
}

impl TestCertificates {
    fn generate() -> Result<TestCertificates, rcgen::Error> {
        let ca = certificate_authority("Statehouse test CA")?;
        let other = certificate_authority("Another test CA")?;
        let (server_cert_pem, server_key_pem) = leaf(
            &ca,
            "statehouse test server",
            &["127.0.0.1", "localhost"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (client_cert_pem, client_key_pem) = leaf(
            &ca,
            "statehouse test client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let (misnamed_cert_pem, misnamed_key_pem) = leaf(
            &ca,
            "another server",
            &["redis.invalid"],
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )?;
        Ok(TestCertificates {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem: other.pem(),
            misnamed_cert_pem,
            misnamed_key_pem,
        })
    }

    /// The CA that signed the servers' and the client's certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The client certificate, for mutual TLS.
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }

    /// The client certificate's private key (PKCS#8).
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// A CA that signed none of these certificates.
    pub fn other_ca_pem(&self) -> &str {
        &self.other_ca_pem
    }

    /// Writes the CA and a server certificate and key into `dir` as `ca.crt`, `server.crt`
    /// and `server.key`.
    pub(crate) fn write_server_files(
        &self,
        dir: &std::path::Path,
        misnamed: bool,
    ) -> io::Result<()> {
        let (cert, key) = if misnamed {
            (&self.misnamed_cert_pem, &self.misnamed_key_pem)
        } else {
            (&self.server_cert_pem, &self.server_key_pem)
        };
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("server.crt"), cert)?;
        std::fs::write(dir.join("server.key"), key)?;
        Ok(())
    }
}

fn certificate_authority(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

/// A certificate signed by `ca` for `names` (IP addresses or DNS names), and its key.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<(String, String), rcgen::Error> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}
