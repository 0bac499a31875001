//! `edge-ota agent …`: run the agent, or talk to the running one through its API.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use hyper::Method;

use super::api::Client;
use crate::config::Config;
use crate::error::{Error, Result};

/// `edge-ota agent [ACTION]`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub action: Option<AgentAction>,
}

#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Run the agent in the foreground (the default; for systemd or an init script).
    Run,
    /// Phase, desired state, running and staged release, last result, recent transitions.
    Status,
    /// The desired state the agent works on.
    Desired,
    /// Give the agent a desired state (YAML or JSON file, - for standard input).
    Set { file: PathBuf },
    /// Stage the desired release now, even outside its windows.
    Stage,
    /// Apply the desired release now (staging it first), even outside its windows.
    Apply,
    /// Start nothing new (a running download stops at its next block).
    Pause,
    /// Go on after a pause.
    Resume,
    /// Follow the agent's events (JSON Lines: progress, phase changes, notices).
    Events,
}

fn socket(config: &Path) -> Result<PathBuf> {
    let cfg = Config::load(config)?;
    Ok(cfg
        .agent
        .ok_or_else(|| Error::Config {
            path: config.into(),
            reason: "no [agent] section".into(),
        })?
        .socket)
}

/// Run `edge-ota agent …`.
pub fn run(config: &Path, json: bool, args: AgentArgs) -> Result<u8> {
    let action = args.action.unwrap_or(AgentAction::Run);
    if let AgentAction::Run = action {
        let cfg = Config::load(config)?;
        super::run(&cfg)?;
        return Ok(0);
    }
    let client = Client::new(&socket(config)?);
    let (method, path, body) = match action {
        AgentAction::Run => unreachable!("handled above"),
        AgentAction::Events => {
            client.follow("/v1/events", |line| {
                println!("{line}");
                true
            })?;
            return Ok(0);
        }
        AgentAction::Status => (Method::GET, "/v1/status", Vec::new()),
        AgentAction::Desired => (Method::GET, "/v1/desired", Vec::new()),
        AgentAction::Set { file } => {
            let body = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|e| Error::io("reading standard input", e))?;
                b
            } else {
                std::fs::read(&file)
                    .map_err(|e| Error::io(format!("reading {}", file.display()), e))?
            };
            (Method::PUT, "/v1/desired", body)
        }
        AgentAction::Stage => (Method::POST, "/v1/stage", Vec::new()),
        AgentAction::Apply => (Method::POST, "/v1/apply", Vec::new()),
        AgentAction::Pause => (Method::POST, "/v1/pause", Vec::new()),
        AgentAction::Resume => (Method::POST, "/v1/resume", Vec::new()),
    };
    let (status, body) = client.request(method, path, body)?;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if status >= 400 {
        let msg = v["error"].as_str().unwrap_or("error").to_string();
        return Err(if status == 409 || status == 404 {
            Error::Usage(format!("agent: {msg}"))
        } else {
            Error::io("agent", std::io::Error::other(msg))
        });
    }
    if json || path != "/v1/status" {
        if json || v.get("result").is_none() {
            println!("{}", String::from_utf8_lossy(&body).trim_end());
        } else {
            println!("{}", v["result"].as_str().unwrap_or_default());
        }
    } else {
        print!("{}", render_status(&v));
    }
    Ok(0)
}

/// `agent status` for people.
fn render_status(v: &serde_json::Value) -> String {
    let a = &v["agent"];
    let mut s = format!("phase: {}", a["phase"].as_str().unwrap_or("?"));
    if a["paused"].as_bool() == Some(true) {
        s += " (paused)";
    }
    s += "\n";
    if let Some(r) = v.get("running").filter(|r| !r.is_null()) {
        s += &format!(
            "running: slot {} version {}\n",
            r["slot"].as_str().unwrap_or("?"),
            r["version"].as_str().unwrap_or("unknown")
        );
    }
    if let Some(d) = a.get("desired").filter(|d| !d.is_null()) {
        let spec = &d["doc"]["spec"];
        s += &format!(
            "desired: {} from {} (activation {})\n",
            spec["version"]
                .as_str()
                .or(spec["bundleId"].as_str())
                .unwrap_or("?"),
            d["origin"].as_str().unwrap_or("?"),
            spec["activation"]["policy"].as_str().unwrap_or("Window")
        );
    }
    if let Some(st) = v["staged_version"].as_str() {
        s += &format!("staged: {st}\n");
    }
    if let Some(n) = a["failures"].as_u64().filter(|n| *n > 0) {
        s += &format!("failures: {n}");
        if let Some(t) = a["retry_at"].as_u64() {
            s += &format!(", next try at {t}");
        }
        s += "\n";
    }
    if let Some(e) = a["last_error"].as_str() {
        s += &format!("last error: {e}\n");
    }
    if let Some(o) = a.get("last_result").filter(|o| !o.is_null()) {
        s += &format!(
            "last result: {} {} at {}{}\n",
            o["result"].as_str().unwrap_or("?"),
            o["target"].as_str().unwrap_or(""),
            o["at"],
            o["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    for n in a["notices"].as_array().into_iter().flatten().rev().take(5) {
        s += &format!("notice: {}\n", n["message"].as_str().unwrap_or(""));
    }
    s
}
