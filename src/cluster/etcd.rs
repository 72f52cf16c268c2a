//! The etcd adapter: one lease per process, kept alive while etcd answers; leadership as
//! a key created under that lease in a transaction; fenced writes; published readings;
//! a watched view of operator intent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;

use super::{
    keys, ClusterError, Intents, Member, NodeIntent, Reading, Roles, StaticNode, Term, View,
};
use crate::config::ClusterConfig;

/// Each etcd call gives up after this long: a hung etcd must not hang a round.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the view of operator intent is read afresh besides the watch (a watch that
/// died without an error must not leave an instance on stale intent for long).
const RELIST_EVERY: Duration = Duration::from_secs(30);

impl From<etcd_client::Error> for ClusterError {
    fn from(e: etcd_client::Error) -> Self {
        ClusterError::Store(e.to_string())
    }
}

/// The session's state, as the election loop last left it.
#[derive(Debug, Clone, Default)]
struct Session {
    lease: Option<i64>,
    /// When the latest keep-alive that etcd answered was sent: the lease holds until at
    /// least this plus the TTL.
    renewed: Option<Instant>,
    /// This process's term, while it holds the leadership key.
    term: Option<Term>,
    /// Who holds the leadership key, as last read.
    leader: Option<String>,
    error: Option<String>,
}

/// A connection to the cluster: this process's lease, its leadership, the intent view.
pub struct Cluster {
    client: Client,
    prefix: String,
    instance: String,
    ttl: Duration,
    session: Mutex<Session>,
    intents: watch::Sender<Intents>,
    /// Leases the used-ticket keys live under, one per [`TICKET_LEASE_SPAN`] of expiry
    /// (a lease per ticket would be a write more per visitor).
    ticket_leases: Mutex<std::collections::HashMap<u64, i64>>,
}

/// Used-ticket keys whose tickets expire within one such span share a lease.
const TICKET_LEASE_SPAN: u64 = 600;

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("instance", &self.instance)
            .field("session", &self.session())
            .finish()
    }
}

/// What the leadership key holds: who leads, for the others to show.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LeaderRecord {
    instance: String,
    pid: u32,
}

impl Cluster {
    /// Connects (lazily: an unreachable etcd is retried in the background, the proxy
    /// serves meanwhile) and starts the session and intent-watch tasks, which stop when
    /// `shutdown` turns true.
    pub async fn start(
        cfg: &ClusterConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&cfg.etcd, Some(options)).await?;
        let cluster = Arc::new(Self {
            client,
            prefix: keys::prefix(&cfg.name),
            instance: cfg.instance.clone(),
            ttl: cfg.lease_ttl,
            session: Mutex::new(Session::default()),
            intents: watch::channel(Intents::default()).0,
            ticket_leases: Mutex::new(std::collections::HashMap::new()),
        });
        tokio::spawn(cluster.clone().run_session(shutdown.clone()));
        tokio::spawn(cluster.clone().run_intents(shutdown));
        Ok(cluster)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    fn session(&self) -> Session {
        self.session.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Session)) {
        if let Ok(mut s) = self.session.lock() {
            f(&mut s);
        }
    }

    /// Until when the lease surely holds, with a margin for clock rates and the round
    /// trip: past it this process acts as if it had lost the leadership.
    fn valid_until(&self, s: &Session) -> Option<Instant> {
        s.renewed.map(|r| r + self.ttl - self.ttl / 4)
    }

    /// This process's term, if it leads and its lease was renewed recently enough.
    /// Checked on the monotonic clock, which runs on while a process is stopped: a
    /// leader resumed after SIGSTOP sees at once that its lease may be gone.
    pub fn leading(&self) -> Option<Term> {
        let s = self.session();
        let term = s.term?;
        (Instant::now() < self.valid_until(&s)?).then_some(term)
    }

    /// Checks, in an etcd transaction, that the leadership key is still bound to
    /// `term`'s lease: called before every provider write.
    pub async fn fence(&self, term: Term) -> Result<(), ClusterError> {
        self.fenced_put(term, Vec::new()).await
    }

    /// Writes `puts` if, and only if, the leadership key is still bound to `term`'s lease
    /// (one transaction), and the lease is still surely held after the answer.
    pub async fn fenced_put(
        &self,
        term: Term,
        puts: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ClusterError> {
        if self.leading() != Some(term) {
            return Err(ClusterError::Fenced);
        }
        let txn = Txn::new()
            .when(vec![
                Compare::lease(keys::leader(&self.prefix), CompareOp::Equal, term.lease),
                Compare::create_revision(
                    keys::leader(&self.prefix),
                    CompareOp::Equal,
                    term.revision,
                ),
            ])
            .and_then(
                puts.into_iter()
                    .map(|(k, v)| TxnOp::put(k, v, None))
                    .collect::<Vec<_>>(),
            );
        let resp = self.client.kv_client().txn(txn).await?;
        if !resp.succeeded() {
            self.update(|s| s.term = None);
            return Err(ClusterError::Fenced);
        }
        if self.leading() != Some(term) {
            return Err(ClusterError::Fenced);
        }
        Ok(())
    }

    /// Records that the waiting-room ticket `subject` (expiring at `expires_unix`) is
    /// used to enter: true the first time on any instance of the cluster, false when it
    /// was used already (a replay, or the same ticket shown to another instance). The
    /// record outlives this process, and is dropped by etcd after the ticket expires.
    pub async fn claim_ticket(
        &self,
        subject: &str,
        expires_unix: u64,
    ) -> Result<bool, ClusterError> {
        let lease = self.ticket_lease(expires_unix).await?;
        let key = keys::ticket(&self.prefix, subject);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key,
                self.instance.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.kv_client().txn(txn))
            .await
            .map_err(|_| ClusterError::Store("ticket claim timed out".into()))??;
        Ok(resp.succeeded())
    }

    /// The lease for used tickets expiring at `expires_unix`: granted once per span, to
    /// end a minute after the span's last ticket.
    async fn ticket_lease(&self, expires_unix: u64) -> Result<i64, ClusterError> {
        let span = expires_unix / TICKET_LEASE_SPAN;
        let known = self
            .ticket_leases
            .lock()
            .ok()
            .and_then(|l| l.get(&span).copied());
        if let Some(lease) = known {
            return Ok(lease);
        }
        let now = super::unix_ms(std::time::SystemTime::now()) / 1000;
        let ends = (span + 1) * TICKET_LEASE_SPAN + 60;
        let ttl = i64::try_from(ends.saturating_sub(now))
            .unwrap_or(i64::MAX)
            .max(60);
        let granted =
            tokio::time::timeout(CALL_TIMEOUT, self.client.lease_client().grant(ttl, None))
                .await
                .map_err(|_| ClusterError::Store("lease grant timed out".into()))??;
        if let Ok(mut leases) = self.ticket_leases.lock() {
            leases.retain(|s, _| (s + 1) * TICKET_LEASE_SPAN + 60 > now);
            leases.entry(span).or_insert(granted.id());
        }
        Ok(granted.id())
    }

    /// Publishes this process's reading under its lease (dropped when the lease ends).
    pub async fn publish(&self, reading: &Reading) -> Result<(), ClusterError> {
        let Some(lease) = self.session().lease else {
            return Err(ClusterError::Store("no lease yet".into()));
        };
        let value = serde_json::to_vec(reading).map_err(|e| ClusterError::Store(e.to_string()))?;
        self.client
            .kv_client()
            .put(
                keys::member(&self.prefix, &self.instance, lease),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let resp = self
            .client
            .kv_client()
            .get(
                keys::members(&self.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().unwrap_or_default();
                let instance = key
                    .strip_prefix(&keys::members(&self.prefix))
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or_default()
                    .to_owned();
                Member {
                    instance,
                    lease: kv.lease(),
                    reading: serde_json::from_slice(kv.value()).ok(),
                }
            })
            .collect())
    }

    /// Every member's latest reading.
    pub async fn readings(&self) -> Result<Vec<Reading>, ClusterError> {
        Ok(self
            .members()
            .await?
            .into_iter()
            .filter_map(|m| m.reading)
            .collect())
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, ClusterError> {
        let resp = self.client.kv_client().get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The leader's ledger as last written (JSON), if any.
    pub async fn ledger(&self) -> Result<Option<Vec<u8>>, ClusterError> {
        self.get(keys::ledger(&self.prefix)).await
    }

    /// The leader's roles of provisioned nodes as last written, if any.
    pub async fn roles(&self) -> Result<Option<Roles>, ClusterError> {
        let key = keys::roles(&self.prefix);
        match self.get(key.clone()).await? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ClusterError::Corrupt {
                        key,
                        reason: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    pub fn ledger_key(&self) -> String {
        keys::ledger(&self.prefix)
    }

    pub fn roles_key(&self) -> String {
        keys::roles(&self.prefix)
    }

    /// The operators' intent as last read from etcd (kept while etcd is away).
    pub fn intents(&self) -> watch::Receiver<Intents> {
        self.intents.subscribe()
    }

    async fn put_or_delete(&self, key: String, value: Option<Vec<u8>>) -> Result<(), ClusterError> {
        let mut kv = self.client.kv_client();
        match value {
            Some(v) => {
                kv.put(key, v, None).await?;
            }
            None => {
                kv.delete(key, None).await?;
            }
        }
        Ok(())
    }

    /// Records (or, with `None`, withdraws) an operator's instruction for node `id`.
    pub async fn set_node_intent(
        &self,
        id: &str,
        intent: Option<NodeIntent>,
    ) -> Result<(), ClusterError> {
        let value = intent
            .map(|i| serde_json::to_vec(&i))
            .transpose()
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        self.put_or_delete(keys::node_intent(&self.prefix, id), value)
            .await
    }

    /// Records (or withdraws) a node added by hand.
    pub async fn set_static(&self, id: &str, node: Option<StaticNode>) -> Result<(), ClusterError> {
        let value = node
            .map(|n| serde_json::to_vec(&n))
            .transpose()
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        self.put_or_delete(keys::static_node(&self.prefix, id), value)
            .await
    }

    /// Records the autoscaler's pause switch for every instance.
    pub async fn set_paused(&self, paused: bool) -> Result<(), ClusterError> {
        self.put_or_delete(
            keys::paused(&self.prefix),
            Some(if paused {
                b"true".to_vec()
            } else {
                b"false".to_vec()
            }),
        )
        .await
    }

    /// The cluster as this process sees it (members read from etcd now).
    pub async fn view(&self) -> View {
        let s = self.session();
        let (members, error) = match self.members().await {
            Ok(m) => (m, s.error.clone()),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        View {
            name: self
                .prefix
                .strip_prefix("/surge/")
                .unwrap_or(&self.prefix)
                .to_owned(),
            instance: self.instance.clone(),
            leader: s.leader.clone(),
            leading: self.leading().is_some(),
            lease: s.lease,
            lease_ttl: self.ttl,
            renewed_ago: s.renewed.map(|r| r.elapsed()),
            members,
            error,
        }
    }

    /// Gives up the leadership and the lease at once (a clean stop): another instance
    /// or this instance's successor takes over without waiting for the lease to expire.
    pub async fn leave(&self) {
        let s = self.session();
        self.update(|s| {
            s.term = None;
            s.lease = None;
        });
        if let Some(lease) = s.lease {
            let mut lease_client = self.client.lease_client();
            let _ = tokio::time::timeout(CALL_TIMEOUT, lease_client.revoke(lease)).await;
        }
    }

    /// Keeps a lease and campaigns for leadership, until `shutdown`.
    async fn run_session(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Renew and campaign often enough that a dead leader is replaced well within
        // the TTL after its lease expires.
        let tick = (self.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            if let Err(e) = self.session_round(&mut keeper).await {
                keeper = None;
                let msg = e.to_string();
                let changed = self.session().error.as_deref() != Some(msg.as_str());
                if changed {
                    tracing::warn!(error = %msg, "cluster: etcd");
                }
                self.update(|s| s.error = Some(msg));
            } else {
                self.update(|s| s.error = None);
            }
        }
    }

    /// One renewal and campaign: grants a lease if there is none (or it expired), renews
    /// it, then takes the leadership key if free or checks it is still ours.
    async fn session_round(
        &self,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<(), ClusterError> {
        let mut s = self.session();
        // A lease not renewed for its whole TTL may be gone: start over with a new one.
        if s.renewed.is_some_and(|r| r.elapsed() >= self.ttl) {
            if s.term.is_some() {
                tracing::warn!("cluster: lease not renewed within its TTL; no longer leading");
            }
            self.update(|s| *s = Session::default());
            *keeper = None;
            // If etcd kept it (it restarted, and leases survive a restart), its keys
            // (the leadership key among them) go now rather than a TTL later.
            if let Some(old) = s.lease {
                let mut lease_client = self.client.lease_client();
                let _ = tokio::time::timeout(CALL_TIMEOUT, lease_client.revoke(old)).await;
            }
            s = Session::default();
        }
        let lease = match s.lease {
            Some(l) => l,
            None => {
                let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
                let sent = Instant::now();
                let granted = self.client.lease_client().grant(ttl, None).await?;
                self.update(|s| {
                    s.lease = Some(granted.id());
                    s.renewed = Some(sent);
                });
                // Present at once (the autoscaler, if any, replaces it every tick): a
                // placeholder reading that holds the size until a real one comes.
                let joined = Reading {
                    instance: self.instance.clone(),
                    pid: std::process::id(),
                    at_ms: super::unix_ms(std::time::SystemTime::now()),
                    connection_rate: 0.0,
                    request_rate: 0.0,
                    in_flight: 0,
                    in_service: 0,
                    latency: Vec::new(),
                    fresh: false,
                    busy: Vec::new(),
                    line: super::LineReading::default(),
                };
                self.publish(&joined).await?;
                granted.id()
            }
        };
        if keeper.is_none() {
            *keeper = Some(self.client.lease_client().keep_alive(lease).await?);
        }
        let Some((k, stream)) = keeper.as_mut() else {
            return Ok(());
        };
        let sent = Instant::now();
        k.keep_alive().await?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, stream.message())
            .await
            .map_err(|_| ClusterError::Store("lease keep-alive: no answer".into()))??;
        match answer {
            Some(r) if r.ttl() > 0 => self.update(|s| s.renewed = Some(sent)),
            _ => {
                // etcd says the lease is gone (it expired while we could not reach it).
                if self.session().term.is_some() {
                    tracing::warn!("cluster: lease expired; no longer leading");
                }
                self.update(|s| *s = Session::default());
                *keeper = None;
                return Ok(());
            }
        }
        self.campaign(lease).await
    }

    /// Creates the leadership key under `lease` if nobody holds it; records who does.
    async fn campaign(&self, lease: i64) -> Result<(), ClusterError> {
        let key = keys::leader(&self.prefix);
        let record = serde_json::to_vec(&LeaderRecord {
            instance: self.instance.clone(),
            pid: std::process::id(),
        })
        .map_err(|e| ClusterError::Store(e.to_string()))?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = self.client.kv_client().txn(txn).await?;
        let was = self.session().term;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            let term = Term { lease, revision };
            tracing::info!(instance = %self.instance, lease = format!("{lease:x}"), "cluster: this instance leads");
            self.update(|s| {
                s.term = Some(term);
                s.leader = Some(self.instance.clone());
            });
            return Ok(());
        }
        let holder = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                (
                    kv.lease(),
                    kv.create_revision(),
                    serde_json::from_slice::<LeaderRecord>(kv.value())
                        .map(|r| r.instance)
                        .unwrap_or_else(|_| "(unreadable)".into()),
                )
            }),
            _ => None,
        });
        let term = match &holder {
            Some((l, rev, _)) if *l == lease => Some(Term {
                lease,
                revision: *rev,
            }),
            _ => None,
        };
        if was.is_some() && term.is_none() {
            tracing::warn!("cluster: leadership key taken over; no longer leading");
        }
        self.update(|s| {
            s.term = term;
            s.leader = holder.map(|(_, _, who)| who);
        });
        Ok(())
    }

    /// Keeps [`Cluster::intents`] up to date: a full read, then a watch from its
    /// revision; on any error (or every [`RELIST_EVERY`]) a full read again.
    async fn run_intents(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let prefix = keys::intents(&self.prefix);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let outcome = tokio::select! {
                r = self.follow_intents(&prefix) => r,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = outcome {
                tracing::debug!(error = %e, "cluster: intent watch; reading again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    async fn follow_intents(&self, prefix: &str) -> Result<(), ClusterError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut view = Intents {
            loaded: true,
            ..Intents::default()
        };
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            if let Err(e) = view.apply(&self.prefix, key, Some(kv.value())) {
                tracing::warn!(error = %e, "cluster: ignoring a record");
            }
        }
        self.intents.send_if_modified(|v| {
            let changed = *v != view;
            *v = view.clone();
            changed
        });
        let (_watcher, mut stream) = self
            .client
            .watch_client()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let relist = tokio::time::sleep(RELIST_EVERY);
        tokio::pin!(relist);
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = &mut relist => return Ok(()),
            };
            let Some(msg) = msg else {
                return Err(ClusterError::Store("intent watch ended".into()));
            };
            if msg.canceled() {
                return Err(ClusterError::Store(format!(
                    "intent watch cancelled: {}",
                    msg.cancel_reason()
                )));
            }
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = kv.key_str().unwrap_or_default();
                let value = match ev.event_type() {
                    etcd_client::EventType::Put => Some(kv.value()),
                    etcd_client::EventType::Delete => None,
                };
                if let Err(e) = view.apply(&self.prefix, key, value) {
                    tracing::warn!(error = %e, "cluster: ignoring a record");
                }
            }
            self.intents.send_if_modified(|v| {
                let changed = *v != view;
                *v = view.clone();
                changed
            });
        }
    }
}
