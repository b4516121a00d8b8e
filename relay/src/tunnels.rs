//! The agents that have a tunnel up, and the numbered channels multiplexed on each tunnel
//! (one per client conversation). The tunnel's reader hands agent → relay channel frames to
//! [`Tunnel::deliver`]; a conversation holds a [`Channel`] and reads them from it. Agent →
//! relay traffic is flow-controlled per channel (relay.proto `ChannelWindow`), so a slow
//! client fills only its own queue and never stalls the tunnel it shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use remote_proto::CHANNEL_WINDOW_BYTES;
use remote_proto::relay::{
    ChannelClosed, ChannelData, ChannelWindow, OpenChannel, RelayMessage, relay_message,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Messages queued to one agent before senders wait.
const TO_AGENT_QUEUE: usize = 1024;

/// What a channel receives from the agent.
#[derive(Debug)]
pub enum ChannelEvent {
    /// One ServerFrame, encoded.
    Frame(Vec<u8>),
    /// The agent closed the channel, or the tunnel went down.
    Closed(String),
}

struct ChannelSlot {
    tx: mpsc::UnboundedSender<ChannelEvent>,
    /// Bytes delivered and not yet consumed; bounded by the window the agent was given.
    queued: Arc<AtomicU64>,
}

/// One agent's tunnel.
pub struct Tunnel {
    pub agent: String,
    pub software: String,
    /// Distinguishes this tunnel from an earlier or later one of the same agent.
    pub generation: u64,
    /// Boxed: the queue's slots are allocated in blocks, and most tunnels are idle.
    to_agent: mpsc::Sender<Box<RelayMessage>>,
    channels: Mutex<HashMap<u64, ChannelSlot>>,
    next_channel: AtomicU64,
    /// Cancelled when the tunnel ends (or is replaced by a newer one).
    pub closed: CancellationToken,
}

impl Tunnel {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ChannelSlot>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send a message to the agent; false when the tunnel is gone.
    pub async fn send(&self, msg: relay_message::Msg) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        self.to_agent
            .send(Box::new(RelayMessage { msg: Some(msg) }))
            .await
            .is_ok()
    }

    /// Open a channel for a conversation of `user` with the agent.
    pub async fn open_channel(self: &Arc<Self>, user: &str) -> Option<Channel> {
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        self.slots().insert(
            id,
            ChannelSlot {
                tx,
                queued: queued.clone(),
            },
        );
        let channel = Channel {
            tunnel: self.clone(),
            id,
            rx,
            queued,
            consumed: 0,
        };
        let open = relay_message::Msg::Open(OpenChannel {
            channel: id,
            user: user.to_string(),
        });
        self.send(open).await.then_some(channel)
    }

    /// A frame from the agent for channel `channel`. Returns false when the agent broke the
    /// channel's window (the channel is then closed).
    pub fn deliver(&self, channel: u64, frame: Vec<u8>) -> bool {
        let mut slots = self.slots();
        let Some(slot) = slots.get(&channel) else {
            // A channel the conversation already left: the agent learns of it soon.
            return true;
        };
        let len = frame.len() as u64;
        let queued = slot.queued.fetch_add(len, Ordering::Relaxed) + len;
        // One frame of slack: the agent checks its window before each frame.
        if queued > CHANNEL_WINDOW_BYTES + remote_proto::MAX_FRAME_BYTES as u64 {
            if let Some(slot) = slots.remove(&channel) {
                let _ = slot.tx.send(ChannelEvent::Closed(
                    "the agent overran the channel's flow-control window".into(),
                ));
            }
            return false;
        }
        if slot.tx.send(ChannelEvent::Frame(frame)).is_err() {
            slots.remove(&channel);
        }
        true
    }

    /// The agent closed channel `channel`.
    pub fn closed_by_agent(&self, channel: u64, reason: String) {
        if let Some(slot) = self.slots().remove(&channel) {
            let _ = slot.tx.send(ChannelEvent::Closed(reason));
        }
    }

    /// Open channels.
    #[cfg(test)]
    fn channel_count(&self) -> usize {
        self.slots().len()
    }

    /// The tunnel ended: every channel learns of it.
    fn shut(&self, reason: &str) {
        self.closed.cancel();
        for (_, slot) in self.slots().drain() {
            let _ = slot.tx.send(ChannelEvent::Closed(reason.to_string()));
        }
    }
}

/// A conversation's end of a channel. Dropping it closes the channel at the agent.
pub struct Channel {
    tunnel: Arc<Tunnel>,
    pub id: u64,
    rx: mpsc::UnboundedReceiver<ChannelEvent>,
    queued: Arc<AtomicU64>,
    /// Bytes consumed since the last window grant.
    consumed: u64,
}

impl Channel {
    pub fn tunnel(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }

    /// The next event; grants the agent more window as frames are consumed.
    pub async fn next(&mut self) -> ChannelEvent {
        let Some(event) = self.rx.recv().await else {
            return ChannelEvent::Closed("the tunnel ended".into());
        };
        if let ChannelEvent::Frame(f) = &event {
            let len = f.len() as u64;
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.consumed += len;
            if self.consumed >= CHANNEL_WINDOW_BYTES / 4 {
                let bytes = std::mem::take(&mut self.consumed);
                let grant = relay_message::Msg::Window(ChannelWindow {
                    channel: self.id,
                    bytes,
                });
                // Waiting here holds up only this conversation, which is what should wait.
                if !self.tunnel.send(grant).await {
                    return ChannelEvent::Closed("the tunnel ended".into());
                }
            }
        }
        event
    }

    /// The client sent its last frame: the agent finishes what it was asked, answers, and
    /// then closes the channel (its Closed event ends the conversation).
    pub async fn close_input(&self) -> bool {
        self.tunnel
            .send(relay_message::Msg::Closed(ChannelClosed {
                channel: self.id,
                reason: "the client sent its last request".into(),
            }))
            .await
    }

    /// Send one ClientFrame (encoded) to the agent; false when the tunnel is gone.
    pub async fn send(&self, frame: Vec<u8>) -> bool {
        self.tunnel
            .send(relay_message::Msg::Channel(ChannelData {
                channel: self.id,
                frame,
            }))
            .await
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if self.tunnel.slots().remove(&self.id).is_some() {
            let _ = self.tunnel.to_agent.try_send(Box::new(RelayMessage {
                msg: Some(relay_message::Msg::Closed(ChannelClosed {
                    channel: self.id,
                    reason: "the client left".into(),
                })),
            }));
        }
    }
}

/// Every agent with a tunnel up.
pub struct Registry {
    tunnels: Mutex<HashMap<String, Arc<Tunnel>>>,
    generation: AtomicU64,
    /// Bumped whenever a tunnel comes up or goes down.
    changed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            tunnels: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            changed: watch::channel(0).0,
        }
    }
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tunnel>>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new tunnel of `agent`, not yet visible to conversations (the greeting comes first).
    /// Returns the tunnel and the receiver of what is sent to the agent.
    pub fn prepare(
        &self,
        agent: &str,
        software: &str,
    ) -> (Arc<Tunnel>, mpsc::Receiver<Box<RelayMessage>>) {
        let (to_agent, rx) = mpsc::channel(TO_AGENT_QUEUE);
        let tunnel = Arc::new(Tunnel {
            agent: agent.to_string(),
            software: software.to_string(),
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
            to_agent,
            channels: Mutex::new(HashMap::new()),
            next_channel: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        (tunnel, rx)
    }

    /// Make a greeted tunnel the agent's, replacing (and closing) an older one: the newest
    /// connection of an agent wins, as after a reconnect the old one may linger half-dead.
    pub fn publish(&self, tunnel: &Arc<Tunnel>) {
        if let Some(old) = self.map().insert(tunnel.agent.clone(), tunnel.clone()) {
            old.shut("the agent reconnected");
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// [`Registry::prepare`] and [`Registry::publish`] at once.
    #[cfg(test)]
    fn register(
        &self,
        agent: &str,
        software: &str,
    ) -> (Arc<Tunnel>, mpsc::Receiver<Box<RelayMessage>>) {
        let (tunnel, rx) = self.prepare(agent, software);
        self.publish(&tunnel);
        (tunnel, rx)
    }

    /// The tunnel ended; forget it unless a newer one replaced it already.
    pub fn unregister(&self, tunnel: &Arc<Tunnel>, reason: &str) {
        {
            let mut map = self.map();
            if map
                .get(&tunnel.agent)
                .is_some_and(|t| t.generation == tunnel.generation)
            {
                map.remove(&tunnel.agent);
            }
        }
        tunnel.shut(reason);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn get(&self, agent: &str) -> Option<Arc<Tunnel>> {
        self.map().get(agent).cloned()
    }

    pub fn is_online(&self, agent: &str) -> bool {
        self.map().contains_key(agent)
    }

    /// Notified whenever a tunnel comes up or goes down.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Close every tunnel (shutdown).
    pub fn close_all(&self, reason: &str) {
        let all: Vec<Arc<Tunnel>> = self.map().drain().map(|(_, t)| t).collect();
        for t in all {
            t.shut(reason);
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_carry_frames_and_close_on_drop() {
        let reg = Registry::default();
        let (tunnel, mut to_agent) = reg.register("a1", "test");
        assert!(reg.is_online("a1"));
        let mut ch = tunnel.open_channel("alice").await.expect("open");
        match to_agent.recv().await.and_then(|m| m.msg) {
            Some(relay_message::Msg::Open(o)) => {
                assert_eq!((o.channel, o.user.as_str()), (ch.id, "alice"))
            }
            other => panic!("expected Open, got {other:?}"),
        }
        assert!(tunnel.deliver(ch.id, b"frame".to_vec()));
        match ch.next().await {
            ChannelEvent::Frame(f) => assert_eq!(f, b"frame"),
            other => panic!("expected a frame, got {other:?}"),
        }
        let id = ch.id;
        drop(ch);
        assert_eq!(tunnel.channel_count(), 0);
        match to_agent.recv().await.and_then(|m| m.msg) {
            Some(relay_message::Msg::Closed(c)) => assert_eq!(c.channel, id),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_agent_that_overruns_its_window_loses_the_channel() {
        let reg = Registry::default();
        let (tunnel, _to_agent) = reg.register("a1", "test");
        let mut ch = tunnel.open_channel("alice").await.expect("open");
        let big = vec![0u8; remote_proto::MAX_FRAME_BYTES];
        let mut ok = true;
        for _ in 0..8 {
            ok &= tunnel.deliver(ch.id, big.clone());
        }
        assert!(!ok, "the window must be enforced");
        loop {
            if let ChannelEvent::Closed(why) = ch.next().await {
                assert!(why.contains("window"), "{why}");
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_reconnect_replaces_the_old_tunnel() {
        let reg = Registry::default();
        let (old, _rx1) = reg.register("a1", "test");
        let mut ch = old.open_channel("alice").await.expect("open");
        let (new, _rx2) = reg.register("a1", "test");
        assert!(old.closed.is_cancelled());
        assert!(matches!(ch.next().await, ChannelEvent::Closed(_)));
        reg.unregister(&old, "gone");
        assert!(
            reg.is_online("a1"),
            "the old tunnel must not remove the new one"
        );
        reg.unregister(&new, "gone");
        assert!(!reg.is_online("a1"));
    }
}
