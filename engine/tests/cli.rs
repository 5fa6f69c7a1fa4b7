//! CLI smoke tests of the `tern` binary (also makes `cargo test` build it, so the
//! end-to-end tests in tests/ always run against a fresh binary).

use std::process::Command;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

#[test]
fn version_and_help() {
    let out = tern().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tern "));
    let out = tern().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "demo", "queue", "check-config"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn check_config_reports_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        "hostname = \"mx.test\"\n[limits]\nrecipients = \"lots\"\n",
    )
    .unwrap();
    let out = tern()
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("recipients") && err.contains("line 3"),
        "{err}"
    );

    std::fs::write(&p, "[limits]\nbogus = 1\n").unwrap();
    let out = tern()
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));

    let out = tern()
        .args(["check-config", "--set", "limits.recipients=7"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("recipients = 7"));
}

#[test]
fn serve_refuses_missing_config() {
    let out = tern()
        .args(["serve", "--config", "/nonexistent/tern.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tern.toml"));
}

#[test]
fn the_example_configuration_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../tern.example.toml");
    let out = tern()
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        effective.contains("hostname = \"mx.example.org\""),
        "{effective}"
    );
    assert!(effective.contains("require_on = ["), "{effective}");
}
