//! Whatever a client sends to the agent's SSH server before and during key exchange (the
//! version line, then binary packets in the clear): the connection may fail, but the server
//! must not panic and must end the connection within bounded time.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use remote_agent::accounts::{AccountDb, AccountStore};
use remote_agent::config::{FileConfig, Overrides};
use remote_agent::ssh::Core;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    rt: tokio::runtime::Runtime,
    core: Core,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut settings = FileConfig::parse("[ssh]\nlogin_grace_time_secs = 1\n", dir.path().as_ref())
            .expect("config")
            .resolve(&Overrides {
                ssh: Some("127.0.0.1:0".into()),
                state_dir: Some(dir.path().to_path_buf()),
                name: None,
                socket: None,
            })
            .expect("resolve")
            .ssh
            .expect("ssh settings");
        settings.max_auth_tries = 3;
        let (key, _) = remote_agent::hostkey::load_or_generate(dir.path()).expect("host key");
        let accounts = AccountDb::new(AccountStore::new(dir.path()));
        let sessions = remote_agent::session::SessionHost::new(Default::default(), dir.path().join("sessions"));
        let core = Core::new(settings, key, accounts, sessions, Default::default());
        World { rt, core, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let peer = "127.0.0.1:40000".parse().expect("addr");
        let local = "127.0.0.1:2222".parse().expect("addr");
        let serve = w.core.serve(server, peer, local, None);
        let talk = async {
            // Most inputs get a valid version line, so the packet parsers are reached too.
            if data.first().is_some_and(|b| b & 1 == 0) {
                let _ = client.write_all(b"SSH-2.0-fuzz\r\n").await;
            }
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let both = async { tokio::join!(serve, talk) };
        // The login grace time (1 s) bounds every connection; allow for scheduling.
        tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("connection not closed within the login grace time");
    });
});
