//! TLS and redirects: plain http only with `--allow-insecure-http` (and
//! flagged), shops with a self-signed certificate or a private CA (the
//! `tls` problem, then trusted through `--tls-ca-file`), CA files refused
//! at `shop add`, and redirects to another host that never carry
//! credentials. Certificates are made in the test (rcgen, ring).

use crate::harness::*;
use cobbyd::sim::{Fault, SimConfig, SimTls};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Fast probes; syncs only when asked (and the first one after add).
const FAST: &str = "[probe]\ninterval = \"300ms\"\ntimeout = \"10s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"2s\"\ndown_after = \"1m\"\n\
                    [sync]\ninterval = \"1h\"\nfull_interval = \"24h\"\nrequest_timeout = \"10s\"\n";

/// A private CA, a leaf it signed, and a self-signed leaf; both leaves are
/// made out to 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    leaf: SimTls,
    self_signed: SimTls,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cobbyd test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.clone())
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let own_key = KeyPair::generate().unwrap();
    let own = CertificateParams::new(names)
        .unwrap()
        .self_signed(&own_key)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        leaf: SimTls {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        },
        self_signed: SimTls {
            cert_pem: own.pem(),
            key_pem: own_key.serialize_pem(),
        },
    }
}

fn tls_sim(tls: SimTls) -> Sim {
    Sim::start_with(SimConfig {
        products: 30,
        tls: Some(tls),
        ..SimConfig::default()
    })
}

fn write(d: &Daemon, name: &str, text: &str) -> String {
    let p = d.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn shop_names(d: &Daemon) -> Vec<String> {
    d.json("/v1/shops")["shops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Every secret the simulator's credentials hold.
fn secrets(sim: &Sim) -> Vec<String> {
    let c = sim.credentials();
    vec![
        c.consumer_key.clone(),
        c.consumer_secret.clone(),
        c.access_token.clone(),
        c.access_token_secret.clone(),
        c.api_key.clone(),
    ]
}

fn assert_no_secret(sim: &Sim, text: &str) {
    for s in secrets(sim) {
        assert!(!text.contains(&s), "secret leaked: {text}");
    }
}

fn creds(platform: &str, sim: &Sim) -> String {
    if platform == "magento1" {
        sim.credentials().m1_toml()
    } else {
        sim.credentials().m2_oauth_toml()
    }
}

#[test]
fn self_signed_shop_is_a_tls_problem_until_its_certificate_is_trusted() {
    let pki = pki();
    let sim = tls_sim(pki.self_signed.clone());
    assert!(sim.url().starts_with("https://"), "{}", sim.url());
    let d = Daemon::start(FAST);
    for platform in ["magento2", "magento1"] {
        let name = format!("self-{platform}");
        // Verified add: refused, with the diagnosis and the hint.
        let out = d.add_shop(&name, platform, &sim.url(), &creds(platform, &sim), &[]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("nothing was saved"), "{err}");
        assert!(
            err.contains("tls") && err.contains("UnknownIssuer") && err.contains("self-signed"),
            "{err}"
        );
        assert!(err.contains("--tls-ca-file"), "{err}");
        assert_no_secret(&sim, &err);
        assert!(!shop_names(&d).contains(&name));
        // Saved anyway: the state says tls, with the hint.
        let out = d.add_shop(
            &name,
            platform,
            &sim.url(),
            &creds(platform, &sim),
            &["--no-verify"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let s = d.wait_shop(&name, "tls problem", |s| s["problem"]["kind"] == "tls");
        assert_eq!(s["state"], "degraded", "{s:#}");
        let msg = s["problem"]["message"].as_str().unwrap();
        assert!(
            msg.contains("certificate") && msg.contains("UnknownIssuer"),
            "{msg}"
        );
        assert!(
            s["problem"]["hint"]
                .as_str()
                .unwrap()
                .contains("--tls-ca-file"),
            "{s:#}"
        );
        assert_no_secret(&sim, &s.to_string());
        assert_eq!(s["insecure_http"], false);
    }
    // The handshake failed before any request: the shop saw none.
    assert_eq!(sim.counters().requests, 0, "{:?}", sim.counters());

    // Trusting the certificate itself makes the shop healthy and synced.
    let ca = write(&d, "shop-cert.pem", &pki.self_signed.cert_pem);
    for platform in ["magento2", "magento1"] {
        let name = format!("trusted-{platform}");
        let out = d.add_shop(
            &name,
            platform,
            &sim.url(),
            &creds(platform, &sim),
            &["--tls-ca-file", &ca],
        );
        assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), d.log());
        let s = d.wait_shop(&name, "first sync", |s| {
            s["sync"]["last_run"]["outcome"] == "ok"
        });
        assert_eq!(s["state"], "healthy", "{s:#}");
        assert_eq!(s["tls_ca_file"], ca.as_str());
        assert_eq!(s["sync"]["products"], 30, "{s:#}");
    }
    let shown = stdout(&d.cli(&["shop", "show", "trusted-magento2"]));
    assert!(shown.contains("shop-cert.pem"), "{shown}");
    // The untrusted shops stay in trouble: roots are per shop.
    assert_eq!(d.shop("self-magento2")["problem"]["kind"], "tls");
    let products = d.cli(&["products", "trusted-magento1"]);
    assert_eq!(stdout(&products).lines().count(), 30);
}

#[test]
fn a_private_ca_bundle_is_trusted_for_its_shop() {
    let pki = pki();
    let sim = tls_sim(pki.leaf.clone());
    let d = Daemon::start(FAST);
    // A bundle: some unrelated certificate first, then the CA.
    let bundle = format!("{}{}", pki.self_signed.cert_pem, pki.ca_pem);
    let ca = write(&d, "bundle.pem", &bundle);
    let url = sim.url_with_host("localhost");
    let out = d.add_shop(
        "private-ca",
        "magento2",
        &url,
        &sim.credentials().m2_oauth_toml(),
        &["--tls-ca-file", &ca],
    );
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), d.log());
    let s = d.wait_shop("private-ca", "first sync", |s| {
        s["sync"]["last_run"]["outcome"] == "ok"
    });
    assert_eq!(s["sync"]["products"], 30, "{s:#}");
    // A full reconcile over TLS mirrors the same catalog.
    let out = d.cli(&["sync", "private-ca", "--full", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let exported: Vec<Value> = stdout(&d.cli(&["products", "private-ca"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 30);
    // The file is read whenever the client is built: gone after a reload,
    // the shop has a tls problem that names the file.
    std::fs::remove_file(&ca).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let s = d.wait_shop("private-ca", "CA file problem", |s| {
        s["problem"]["kind"] == "tls"
    });
    let msg = s["problem"]["message"].as_str().unwrap();
    assert!(
        msg.contains("cannot read the CA file") && msg.contains("bundle.pem"),
        "{msg}"
    );
    // Without the CA file the same shop is refused.
    let out = d.add_shop(
        "no-ca",
        "magento2",
        &url,
        &sim.credentials().m2_oauth_toml(),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("UnknownIssuer"), "{}", stderr(&out));
}

#[test]
fn unusable_tls_ca_files_are_refused_at_add() {
    let pki = pki();
    let d = Daemon::start(FAST);
    let creds = "access_token = \"t4q8sim0access0token00c5d9e2f7a3\"\n";
    let missing = d.dir.path().join("missing.pem");
    let not_pem = write(&d, "notes.txt", "this is not a certificate\n");
    let with_key = write(
        &d,
        "with-key.pem",
        &format!("{}{}", pki.leaf.cert_pem, pki.leaf.key_pem),
    );
    let unreadable = d.dir.path().join("a-directory.pem");
    std::fs::create_dir(&unreadable).unwrap();
    for (file, why) in [
        (missing.to_str().unwrap(), "cannot read the CA file"),
        (&not_pem, "no certificate found"),
        (&with_key, "contains a private key"),
        (unreadable.to_str().unwrap(), "cannot read the CA file"),
    ] {
        // An https URL nobody serves: the file is judged before any probe.
        let out = d.add_shop(
            "ca",
            "magento2",
            "https://127.0.0.1:9",
            creds,
            &["--auth", "bearer", "--tls-ca-file", file, "--no-verify"],
        );
        assert_eq!(out.status.code(), Some(1), "{file}");
        let err = stderr(&out);
        assert!(
            err.contains("tls_ca_file") && err.contains(why),
            "{file}: {err}"
        );
        assert!(err.contains(file), "names the file: {err}");
        assert!(!err.contains("BEGIN PRIVATE KEY"), "{err}");
    }
    // The CA file is for https only.
    let ok = write(&d, "ca.pem", &pki.ca_pem);
    let out = d.add_shop(
        "ca",
        "magento2",
        "http://127.0.0.1:9",
        creds,
        &["--auth", "bearer", "--tls-ca-file", &ok, "--no-verify"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("https:// URLs only"),
        "{}",
        stderr(&out)
    );
    // The daemon checks too: a relative path means nothing to it.
    let body = serde_json::json!({
        "name": "ca", "platform": "magento2", "url": "https://127.0.0.1:9", "auth": "bearer",
        "credentials": {"access_token": "t4q8sim0access0token00c5d9e2f7a3"},
        "tls_ca_file": "ca.pem", "no_verify": true,
    });
    let (code, answer) = d.http("POST", "/v1/shops", Some(&body.to_string()));
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("absolute"), "{answer}");
    assert!(shop_names(&d).is_empty(), "nothing stored");
    // A relative path given to the CLI is made absolute: accepted.
    let out = Command::new(BIN)
        .current_dir(d.dir.path())
        .args([
            "shop",
            "add",
            "ca",
            "--platform",
            "magento2",
            "--url",
            "https://127.0.0.1:9",
            "--auth",
            "bearer",
            "--tls-ca-file",
            "ca.pem",
            "--no-verify",
            "--credentials-file",
            "-",
            "--config",
        ])
        .arg(&d.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(creds.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(d.shop("ca")["tls_ca_file"], ok.as_str());
}

#[test]
fn plain_http_needs_the_flag_and_stays_flagged() {
    let sim = Sim::start(20);
    let d = Daemon::start(FAST);
    let file = write(&d, "creds.toml", &sim.credentials().m2_oauth_toml());
    let plain = [
        "shop",
        "add",
        "acme",
        "--platform",
        "magento2",
        "--url",
        &sim.url(),
        "--credentials-file",
        &file,
    ];
    let out = d.cli(&plain);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("http://")
            && err.contains("https://")
            && err.contains("--allow-insecure-http"),
        "{err}"
    );
    // The daemon refuses as well.
    let body = serde_json::json!({
        "name": "acme", "platform": "magento2", "url": sim.url(),
        "credentials": toml::from_str::<toml::Table>(&sim.credentials().m2_oauth_toml()).unwrap(),
    });
    let (code, answer) = d.http("POST", "/v1/shops", Some(&body.to_string()));
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("--allow-insecure-http"), "{answer}");
    assert!(shop_names(&d).is_empty());
    assert_eq!(sim.counters().requests, 0);

    let mut with_flag = plain.to_vec();
    with_flag.push("--allow-insecure-http");
    let out = d.cli(&with_flag);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("plain http"), "{}", stderr(&out));
    d.wait_shop("acme", "healthy", |s| s["state"] == "healthy");
    let v: Value = serde_json::from_str(&stdout(&d.cli(&["status", "--json"]))).unwrap();
    assert_eq!(v["shops"][0]["insecure_http"], true, "{v:#}");
    let table = stdout(&d.cli(&["status"]));
    assert!(
        table.contains("acme: plain http, credentials cross the network unencrypted"),
        "{table}"
    );
    let shown = stdout(&d.cli(&["shop", "show", "acme"]));
    assert!(shown.contains("plain http"), "{shown}");
    let listed = stdout(&d.cli(&["shop", "list"]));
    assert!(listed.contains("(plain http)"), "{listed}");

    // A record written before the flag existed: still used, flagged, and
    // logged at start.
    let mut d = d;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
    {
        let store = cobbyd::store::Store::open(&d.state_dir, 16).unwrap();
        let tree = store.shops();
        let raw = tree.get("acme").unwrap().unwrap();
        let mut rec: serde_json::Map<String, Value> = serde_json::from_slice(&raw).unwrap();
        assert_eq!(rec.remove("allow_insecure_http"), Some(Value::Bool(true)));
        tree.insert("acme", serde_json::to_vec(&rec).unwrap())
            .unwrap();
        tree.flush().unwrap();
    }
    d.restart();
    let log = d.log();
    assert!(
        log.contains("registered before --allow-insecure-http was required"),
        "{log}"
    );
    let s = d.wait_shop("acme", "healthy again", |s| {
        s["state"] == "healthy" && s["last_probe"].is_string()
    });
    assert_eq!(s["insecure_http"], true);
    let shown: Value =
        serde_json::from_str(&stdout(&d.cli(&["shop", "show", "acme", "--json"]))).unwrap();
    assert_eq!(shown["allow_insecure_http"], false, "{shown:#}");
    assert_eq!(shown["insecure_http"], true, "{shown:#}");
}

/// A plain TCP listener that records every byte it receives and answers
/// 404; on 127.0.0.2 (another host than the shop's 127.0.0.1) or 127.0.0.1.
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn start(ip: &str) -> Recorder {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { return };
                let seen = seen2.clone();
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let _ = c.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    seen.lock().unwrap().push(got);
                });
            }
        });
        Recorder { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

#[test]
fn redirects_to_another_host_never_carry_credentials() {
    let sim = Sim::start(20);
    let other_host = Recorder::start("127.0.0.2");
    let other_port = Recorder::start("127.0.0.1");
    let d = Daemon::start(FAST);
    let cases = [
        ("magento1", 307, &other_host, "another host (127.0.0.2)"),
        ("magento1", 308, &other_port, "another port or scheme"),
        ("magento1", 302, &other_host, "another host (127.0.0.2)"),
        ("magento2", 307, &other_host, "another host (127.0.0.2)"),
        ("magento2", 308, &other_port, "another port or scheme"),
        ("magento2", 301, &other_host, "another host (127.0.0.2)"),
    ];
    for (platform, status, to, says) in cases {
        sim.set_fault(Fault::Redirect {
            status,
            to: to.url(),
        });
        let out = d.add_shop("moved", platform, &sim.url(), &creds(platform, &sim), &[]);
        assert_eq!(out.status.code(), Some(1), "{platform} {status}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("HTTP {status}")) && err.contains(says),
            "{platform} {status}: {err}"
        );
        assert!(err.contains("use the final URL"), "{err}");
        assert_no_secret(&sim, &err);
    }
    assert!(shop_names(&d).is_empty());
    // Registered anyway: the shop is misconfigured, with a clear problem.
    sim.set_fault(Fault::Redirect {
        status: 308,
        to: other_host.url(),
    });
    for platform in ["magento1", "magento2"] {
        let name = format!("moved-{platform}");
        let out = d.add_shop(
            &name,
            platform,
            &sim.url(),
            &creds(platform, &sim),
            &["--no-verify"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let s = d.wait_shop(&name, "redirect problem", |s| {
            s["state"] == "misconfigured" && s["consecutive_failures"].as_u64() >= Some(2)
        });
        assert_eq!(s["problem"]["kind"], "http_status", "{s:#}");
        assert_eq!(s["problem"]["http_status"], 308, "{s:#}");
        let msg = s["problem"]["message"].as_str().unwrap();
        assert!(
            msg.contains("redirected to another host (127.0.0.2)")
                && msg.contains("does not follow cross-host redirects"),
            "{msg}"
        );
        assert_no_secret(&sim, &s.to_string());
    }
    assert!(sim.counters().faults_injected > 0);
    // Nothing at all reached the other listeners.
    assert_eq!(other_host.seen(), Vec::<String>::new());
    assert_eq!(other_port.seen(), Vec::<String>::new());
    // The recorder does record (so the emptiness above means something).
    let mut c = std::net::TcpStream::connect(other_host.addr).unwrap();
    c.write_all(b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(other_host.seen().iter().any(|r| r.contains("GET /probe")));
}
