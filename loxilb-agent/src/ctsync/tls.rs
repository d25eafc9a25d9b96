//! Mutual TLS between agents: both sides present a certificate signed by
//! the CA of the directory (`ca.crt`, `tls.crt`, `tls.key`: a Kubernetes
//! TLS Secret mounted as a volume, with the CA added).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// The name a client verifies when none is configured (the name check is
/// then skipped: any certificate of the CA is accepted, as on the server).
pub const DEFAULT_SERVER_NAME: &str = "loxilb-ctsync";

/// Both sides' TLS configurations, from one directory.
#[derive(Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The name the client asks for and (when configured) checks.
    pub server_name: ServerName<'static>,
}

pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate file ({e:?})", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks)",
            path.display()
        );
    }
    Ok(certs)
}

pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        anyhow!(
            "{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1 expected): {e:?}",
            path.display()
        )
    })
}

impl Tls {
    /// Load `dir/ca.crt`, `dir/tls.crt`, `dir/tls.key`. `server_name`:
    /// the name the peers' certificates must carry; `None` accepts any
    /// certificate the CA signed.
    pub fn load(dir: &Path, server_name: Option<&str>) -> Result<Self> {
        let provider = Arc::new(ring::default_provider());
        let ca_path = dir.join(CA_FILE);
        let mut roots = RootCertStore::empty();
        for c in certs(&ca_path)? {
            roots
                .add(c)
                .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca_path.display()))?;
        }
        let roots = Arc::new(roots);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let chain = certs(&cert_path)?;
        let key = key(&key_path)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| anyhow!("{}: {e}", ca_path.display()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                anyhow!(
                    "{} and {} do not make a usable certificate and key: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| anyhow!("{}: {e}", ca_path.display()))?;
        let verifier = Arc::new(CaOnly {
            inner: webpki,
            check_name: server_name.is_some(),
        });
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                anyhow!(
                    "{} and {} do not make a usable certificate and key: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
        let name = server_name.unwrap_or(DEFAULT_SERVER_NAME);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| anyhow!("{name:?} is not a valid TLS server name: {e}"))?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
            server_name,
        })
    }
}

/// The certificates of a directory, reloaded when its files change: a
/// mounted Kubernetes Secret is updated in place (an atomic symlink swap)
/// when cert-manager or an operator rotates it. Each new connection, in
/// or out, asks for [`TlsSource::current`]: it compares the three files'
/// contents with those last loaded (a few KiB, read per connection, and
/// connections are long-lived) and loads them again when they differ.
/// Connections already up keep the certificates they were made with. A
/// change that does not load (a half-written key, a certificate of
/// another key) is logged once and the previous certificates stay in use
/// until the files are whole again.
pub struct TlsSource {
    dir: PathBuf,
    server_name: Option<String>,
    state: Mutex<Loaded>,
}

struct Loaded {
    /// The files' contents the current [`Tls`] was made from.
    files: Vec<u8>,
    tls: Tls,
    /// The contents of a change that failed to load (warned once).
    refused: Option<Vec<u8>>,
    reloads: u64,
}

/// `ca.crt`, `tls.crt` and `tls.key` of `dir`, one after the other.
fn contents(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut all = vec![];
    for f in [CA_FILE, CERT_FILE, KEY_FILE] {
        let b = std::fs::read(dir.join(f))?;
        all.extend_from_slice(&(b.len() as u64).to_le_bytes());
        all.extend_from_slice(&b);
    }
    Ok(all)
}

impl TlsSource {
    /// Load the directory now (errors name the file at fault).
    pub fn load(dir: &Path, server_name: Option<&str>) -> Result<Self> {
        let files = contents(dir).unwrap_or_default();
        let tls = Tls::load(dir, server_name)?;
        Ok(TlsSource {
            dir: dir.to_path_buf(),
            server_name: server_name.map(str::to_string),
            state: Mutex::new(Loaded {
                files,
                tls,
                refused: None,
                reloads: 0,
            }),
        })
    }

    /// The certificates to use for a new connection: the directory's,
    /// reloaded if the files changed since the last load.
    pub fn current(&self) -> Tls {
        let mut st = self.state.lock().expect("tls lock");
        let Ok(now) = contents(&self.dir) else {
            // A file missing for a moment (mid-rotation): keep what works.
            return st.tls.clone();
        };
        if now != st.files && st.refused.as_ref() != Some(&now) {
            match Tls::load(&self.dir, self.server_name.as_deref()) {
                Ok(t) => {
                    st.tls = t;
                    st.files = now;
                    st.refused = None;
                    st.reloads += 1;
                    tracing::info!(
                        "ctsync: certificates in {} changed: reloaded (new connections use them)",
                        self.dir.display()
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        "ctsync: certificates in {} changed but do not load ({e:#}); \
                         the previous ones stay in use until the files are whole",
                        self.dir.display()
                    );
                    st.refused = Some(now);
                }
            }
        }
        st.tls.clone()
    }

    /// How often the certificates were reloaded since start.
    pub fn reloads(&self) -> u64 {
        self.state.lock().expect("tls lock").reloads
    }
}

/// The webpki verifier (chain to the CA, validity dates, key usage), with
/// the name check optional.
#[derive(Debug)]
struct CaOnly {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA and the directories of certificates it signs.
    pub struct TestCa {
        pub cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub fn new(name: &str) -> Self {
            let mut p = CertificateParams::new(vec![]).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, name.to_string());
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            TestCa {
                cert_pem: cert.pem(),
                issuer: Issuer::new(p, key),
            }
        }

        /// A directory with `ca.crt` (of `trust`), and `tls.crt`/`tls.key`
        /// signed by this CA for `name`.
        pub fn dir(&self, trust: &TestCa, name: &str) -> tempdir::Dir {
            let d = tempdir::Dir::new(name);
            let p = CertificateParams::new(vec![name.to_string()]).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            std::fs::write(d.0.join(CA_FILE), &trust.cert_pem).unwrap();
            std::fs::write(d.0.join(CERT_FILE), cert.pem()).unwrap();
            std::fs::write(d.0.join(KEY_FILE), key.serialize_pem()).unwrap();
            d
        }
    }

    pub mod tempdir {
        /// A directory removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(tag: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ctsync-{tag}-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let ca = TestCa::new("ca");
        let d = ca.dir(&ca, "node-a");
        assert!(Tls::load(&d.0, None).is_ok());
        std::fs::write(d.0.join(KEY_FILE), "not a key").unwrap();
        let e = format!("{:#}", Tls::load(&d.0, None).err().unwrap());
        assert!(e.contains("tls.key") && e.contains("private key"), "{e}");
        std::fs::write(d.0.join(CA_FILE), "").unwrap();
        let e = format!("{:#}", Tls::load(&d.0, None).err().unwrap());
        assert!(e.contains("ca.crt") && e.contains("no certificate"), "{e}");
        std::fs::remove_file(d.0.join(CERT_FILE)).unwrap();
        std::fs::write(d.0.join(CA_FILE), &ca.cert_pem).unwrap();
        let e = format!("{:#}", Tls::load(&d.0, None).err().unwrap());
        assert!(e.contains("tls.crt") && e.contains("cannot read"), "{e}");
        let e = format!("{:#}", Tls::load(&d.0, Some("bad name!")).err().unwrap());
        assert!(e.contains("tls.crt"), "{e}");
    }
}
