//! Test certificates for the agents' mutual TLS (conntrack sync): a CA
//! and, per node, a directory laid out like a mounted Kubernetes TLS
//! Secret (`ca.crt`, `tls.crt`, `tls.key`), removed on drop.

use std::path::PathBuf;

use loxilb_agent::ctsync;

pub struct Certs {
    pub dirs: Vec<PathBuf>,
}

impl Certs {
    /// One directory per name in `nodes` (the name is the certificate's
    /// subject alternative name), all signed by one new CA.
    pub fn new(nodes: &[&str]) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = p.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(p, ca_key);
        // Unique per set: tests of one process run side by side, and each
        // set's directories go when it is dropped.
        static SETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let set = SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut dirs = vec![];
        for n in nodes {
            let d = std::env::temp_dir().join(format!("lxct-tls-{n}-{}-{set}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![n.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(d.join(ctsync::CA_FILE), &ca_pem).unwrap();
            std::fs::write(d.join(ctsync::CERT_FILE), cert.pem()).unwrap();
            std::fs::write(d.join(ctsync::KEY_FILE), key.serialize_pem()).unwrap();
            dirs.push(d);
        }
        Certs { dirs }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
