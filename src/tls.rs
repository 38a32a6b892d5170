//! TLS: the listener's rustls server configuration, the trust store for https upstreams and the
//! identity provider, and `coatcheck dev-cert` (a local development CA and a server certificate).
//!
//! One crypto provider everywhere: aws-lc-rs (see `../shared/CRATES.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS setup problem, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Installs aws-lc-rs as the process-wide rustls provider (idempotent). reqwest and
/// hyper-rustls pick it up from there.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a PEM certificate chain, naming the file on failure.
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("is not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("contains no PEM CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |reason: String| TlsError::File {
        key: "server.tls.key",
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        bad(format!(
            "contains no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
        ))
    })
}

/// The listener's certificate and key: one swap point read at every TLS handshake, so a reload
/// (`ServerCert::replace_with`) applies to new connections while open ones keep the certificate they
/// were made with.
#[derive(Debug)]
pub struct ServerCert {
    current: ArcSwap<CertifiedKey>,
}

impl ServerCert {
    /// Reads and checks the certificate chain and its private key.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, TlsError> {
        Ok(ServerCert {
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
        })
    }

    /// From now on, new handshakes get `other`'s certificate.
    pub(crate) fn replace_with(&self, other: ServerCert) {
        self.current.store(other.current.into_inner());
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs("server.tls.cert", cert)?;
    let key_der = load_key(key)?;
    CertifiedKey::from_der(certs, key_der, &provider()).map_err(|e| TlsError::File {
        key: "server.tls.key",
        path: key.to_owned(),
        reason: format!(
            "does not match the certificate in {} or is unsupported: {e}",
            cert.display()
        ),
    })
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, the certificate
/// from `cert` (read per handshake).
pub fn server_config(cert: Arc<ServerCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A trust store: the Mozilla roots (webpki-roots) plus, optionally, the certificates of `extra_ca`.
pub fn root_store(key: &'static str, extra_ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        for cert in load_certs(key, path)? {
            roots.add(cert).map_err(|e| TlsError::File {
                key,
                path: path.to_owned(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    Ok(roots)
}

/// A client TLS configuration trusting `roots`, offering the given ALPN protocols.
pub(crate) fn client_config(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Validity of the development CA, in days (ten years).
pub(crate) const DEV_CA_DAYS: i64 = 3650;
/// Validity of a development server certificate, in days: 397 is under every browser's limit
/// (Apple platforms refuse more than 825 days even for private CAs; public CAs are held to 398).
pub(crate) const DEV_CERT_DAYS: i64 = 397;

/// Files written by [`generate_dev_certs`].
#[derive(Debug)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Generates a development CA (`ca.crt`, `ca.key`) and a server certificate for `hosts` signed by
/// it (`localhost.crt` holding leaf + CA, `localhost.key`) in `out`. Private keys are written 0600.
pub fn generate_dev_certs(out: &Path, hosts: &[String]) -> Result<DevCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(out).map_err(|e| TlsError::Write {
        path: out.to_owned(),
        source: e,
    })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "coatcheck development CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "coatcheck dev-cert");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Start a day back so clock skew between machines does not make a fresh certificate invalid.
    let now = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    ca_params.not_before = now;
    ca_params.not_after = now + time::Duration::days(DEV_CA_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map(String::as_str).unwrap_or("localhost"),
    );
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now;
    params.not_after = now + time::Duration::days(DEV_CERT_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    let files = DevCerts {
        ca_cert: out.join("ca.crt"),
        cert: out.join("localhost.crt"),
        key: out.join("localhost.key"),
    };
    write(&files.ca_cert, ca.pem().as_bytes(), false)?;
    write(&out.join("ca.key"), ca_key_pem.as_bytes(), true)?;
    write(
        &files.cert,
        format!("{}{}", cert.pem(), ca.pem()).as_bytes(),
        false,
    )?;
    write(&files.key, key.serialize_pem().as_bytes(), true)?;
    Ok(files)
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut f = opts.open(path).map_err(|e| TlsError::Write {
        path: path.to_owned(),
        source: e,
    })?;
    f.write_all(bytes).map_err(|e| TlsError::Write {
        path: path.to_owned(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_load_into_a_server_config() {
        install_provider();
        let dir = std::env::temp_dir().join(format!("coatcheck-devcert-{}", std::process::id()));
        let files = generate_dev_certs(&dir, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        server_config(Arc::new(ServerCert::load(&files.cert, &files.key).unwrap())).unwrap();
        assert_eq!(load_certs("x", &files.cert).unwrap().len(), 2);
        root_store("x", Some(&files.ca_cert)).unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_key_that_is_not_pem_names_the_file() {
        let dir = std::env::temp_dir().join(format!("coatcheck-badkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = generate_dev_certs(&dir, &["localhost".into()]).unwrap();
        std::fs::write(&files.key, "not a key").unwrap();
        let err = ServerCert::load(&files.cert, &files.key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.tls.key") && err.contains("localhost.key"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
