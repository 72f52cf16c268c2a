//! Fencing in a cluster: the autoscaler writes (to the provider, to its ledger and roles
//! in etcd) only within the leadership term it planned in, checked in an etcd
//! transaction right before each write. Standalone, nothing is fenced.

use std::sync::{Arc, Mutex};

use crate::cluster::{Cluster, ClusterError, Term};
use crate::provider::{CreateSpec, Device, Listing, Offer, Provider, ProviderError};

/// The term the autoscaler plans in, shared by its fenced providers and its ledger.
#[derive(Debug, Clone)]
pub struct Gate {
    cluster: Arc<Cluster>,
    term: Arc<Mutex<Option<Term>>>,
}

impl Gate {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            term: Arc::new(Mutex::new(None)),
        }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The term this round plans in (`None`: not leading; every write is held).
    pub fn set_term(&self, term: Option<Term>) {
        if let Ok(mut t) = self.term.lock() {
            *t = term;
        }
    }

    fn term(&self) -> Option<Term> {
        self.term.lock().ok().and_then(|t| *t)
    }

    /// Whether a write may go out now: this instance still holds the leadership key
    /// under the round's term (an etcd transaction).
    pub async fn check(&self) -> Result<(), ClusterError> {
        let term = self.term().ok_or(ClusterError::Fenced)?;
        self.cluster.fence(term).await
    }

    /// Writes `puts` to etcd within the round's term.
    pub async fn put(&self, puts: Vec<(String, Vec<u8>)>) -> Result<(), ClusterError> {
        let term = self.term().ok_or(ClusterError::Fenced)?;
        self.cluster.fenced_put(term, puts).await
    }
}

/// A provider whose writes (create, delete, attach) are fenced by a [`Gate`]; reads pass
/// straight through. Without a gate (standalone) it is the provider itself.
#[derive(Debug)]
pub struct Fenced<P> {
    inner: P,
    gate: Option<Gate>,
}

impl<P> Fenced<P> {
    pub fn new(inner: P, gate: Option<Gate>) -> Self {
        Self { inner, gate }
    }

    async fn may_write(&self) -> Result<(), ProviderError> {
        match &self.gate {
            None => Ok(()),
            Some(g) => g
                .check()
                .await
                .map_err(|e| ProviderError::Held(e.to_string())),
        }
    }
}

impl<P: Provider> Provider for Fenced<P> {
    async fn offers(&self) -> Result<Vec<Offer>, ProviderError> {
        self.inner.offers().await
    }

    /// The fence is checked before every attempt, not once before them all: a term
    /// may end during a back-off.
    async fn create(&self, spec: &CreateSpec) -> Result<Device, ProviderError> {
        crate::provider::order(&self.inner, spec, || self.may_write()).await
    }

    async fn order_once(&self, spec: &CreateSpec, again: bool) -> Result<Device, ProviderError> {
        self.may_write().await?;
        self.inner.order_once(spec, again).await
    }

    fn retry(&self) -> crate::provider::http::Retry {
        self.inner.retry()
    }

    async fn get(&self, id: &str) -> Result<Device, ProviderError> {
        self.inner.get(id).await
    }

    async fn list(&self, tag: &str) -> Result<Vec<Device>, ProviderError> {
        self.inner.list(tag).await
    }

    async fn inventory(&self, tag: &str) -> Result<Listing, ProviderError> {
        self.inner.inventory(tag).await
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        self.may_write().await?;
        self.inner.delete(id).await
    }

    async fn attach(&self, id: &str, network: &str) -> Result<(), ProviderError> {
        self.may_write().await?;
        self.inner.attach(id, network).await
    }

    async fn private_address(
        &self,
        id: &str,
        network: &str,
    ) -> Result<Option<std::net::IpAddr>, ProviderError> {
        self.inner.private_address(id, network).await
    }
}
