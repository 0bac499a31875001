//! A throwaway PKI for TLS tests, made with the `openssl` command (Debian's): a CA, a server
//! certificate for 127.0.0.1 and a client certificate, all signed by that CA and valid for two
//! days. Files in `dir`: `ca.pem`/`ca.key`, `server.pem`/`server.key`, `client.pem`/`client.key`.

use std::io;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Create the CA and the two certificates in `dir` (P-256 keys: quick to make).
pub fn make(dir: &Path) -> io::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=edge-ota test CA",
    ];
    openssl(dir, &[&["req", "-x509"][..], &ec, &ca].concat())?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extf), ext)?;
        let subj = format!("/CN=edge-ota test {name}");
        let req = ["-keyout", &key, "-out", &csr, "-subj", &subj];
        openssl(dir, &[&["req"][..], &ec, &req].concat())?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        )?;
    }
    Ok(())
}
