//! Admission, decided once per request for every protocol: who is already in the shop,
//! who waits in line, who is turned away.
//!
//! "In" means the admission cookie surge signed (one random id per visitor inside the
//! signature). Nothing the shopper or the blade sets lets a request past the line: a
//! bare `cart` cookie is a newcomer's, and so is a route cookie (it names only a blade,
//! the same for every cart there, for days). Priority paths (cart, checkout) get their
//! headroom only for shoppers who are in.
//!
//! A newcomer's page load gets the shop or a place in line, never a plain 503: when the
//! shop sheds it, it gets a place; when it is let in from the line and the shop is full a
//! moment later, it keeps its place at the front (nothing is spent until it is served).
//! Only a newcomer that is not a page load (an API client) gets the 503 while others
//! wait, and so does a page load when the line is at its bound.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::Method;

use super::answers;
use super::conn_info::ConnInfo;
use super::forward::Forwarder;
use super::headers::{self, RequestView, X_REQUEST_ID};
use super::route::RouteSigner;
use crate::config::WaitingRoomConfig;
use crate::pool::shed::{self, Admitted, ShedConfig};
use crate::pool::waiting::{self, Capacity, Room, Ticket, Visit};
use crate::telemetry::names;

/// What admission let in: the room under the shedding limit, and cookies for the answer.
#[derive(Default)]
pub(super) struct Entry {
    pub(super) admitted: Option<Admitted>,
    pub(super) admission_cookie: Option<HeaderValue>,
    pub(super) queue_cookie: Option<HeaderValue>,
}

/// What every admission cookie's signed subject starts with (then the visitor's id).
const ADMISSION_PREFIX: &str = "in.";

/// The waiting room's parts, when the pool has one.
struct RoomParts<'a> {
    room: &'a Room,
    config: &'a WaitingRoomConfig,
    signer: &'a RouteSigner,
}

type Answer = super::answers::Own;

impl Forwarder {
    /// Admission: the waiting room's poll, then who the request comes from, then the
    /// shop (a short wait for room), the line, or surge's 503. `Err`: surge's own answer,
    /// the request goes no further.
    pub(super) async fn enter<V: RequestView>(
        self: &Rc<Self>,
        view: &V,
        conn_info: &ConnInfo,
        request_id: &HeaderValue,
        unix_now: u64,
    ) -> Result<Entry, Answer> {
        if view.path() == answers::QUEUE_PATH {
            if let Some(resp) = self.queue_poll(view, unix_now, conn_info) {
                return Err(own_answer(resp, request_id, conn_info));
            }
        }
        let Some(cfg) = self.pool.settings().shed.as_ref() else {
            return Ok(Entry::default());
        };
        let secure = conn_info.tls.is_some();
        let entry = match self.classify(cfg, view, unix_now, secure) {
            (shed::Class::Newcomer, _) => {
                self.newcomer(cfg, view, unix_now, secure, conn_info, request_id)
                    .await
            }
            (class, renewed) => match self.admit(cfg, class).await {
                Some(admitted) => Ok(Entry {
                    admitted: Some(admitted),
                    admission_cookie: renewed,
                    queue_cookie: None,
                }),
                None => Err(answers::shed(request_id)),
            },
        };
        entry.map_err(|resp| own_answer(resp, request_id, conn_info))
    }

    /// Who the request comes from (see [`shed::Class`]), and the admission cookie to
    /// renew (a shopper's past half its life, same id).
    fn classify(
        &self,
        cfg: &ShedConfig,
        view: &impl RequestView,
        unix_now: u64,
        secure: bool,
    ) -> (shed::Class, Option<HeaderValue>) {
        let admission = self.admission.as_ref().and_then(|signer| {
            headers::cookie_of(view, &cfg.admission_cookie)
                .and_then(|v| signer.verify(v, unix_now))
                .filter(|v| v.backend.starts_with(ADMISSION_PREFIX))
        });
        let Some(admission) = admission else {
            return (shed::Class::Newcomer, None);
        };
        let renewed = admission
            .renew
            .then(|| self.admission_cookie(cfg, admission.backend, unix_now, secure))
            .flatten();
        let class = if shed::is_priority(cfg, view.path()) {
            shed::Class::Priority
        } else {
            shed::Class::Admitted
        };
        (class, renewed)
    }

    /// The admission cookie naming `subject` (a visitor's own id).
    fn admission_cookie(
        &self,
        cfg: &ShedConfig,
        subject: &str,
        unix_now: u64,
        secure: bool,
    ) -> Option<HeaderValue> {
        let signer = self.admission.as_ref()?;
        let cookie = format!(
            "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
            cfg.admission_cookie,
            signer.issue(subject, unix_now),
            cfg.session_duration.as_secs(),
            if secure { "; Secure" } else { "" }
        );
        HeaderValue::from_str(&cookie).ok()
    }

    /// A newcomer let in: counted, and given its own admission cookie.
    fn newcomer_in(
        &self,
        cfg: &ShedConfig,
        admitted: Admitted,
        unix_now: u64,
        secure: bool,
    ) -> Entry {
        let id = format!("{ADMISSION_PREFIX}{:016x}", fastrand::u64(..));
        Entry {
            admitted: Some(admitted),
            admission_cookie: self.admission_cookie(cfg, &id, unix_now, secure),
            queue_cookie: None,
        }
    }

    /// A newcomer let straight in (no place in line): counted for the autoscaler's meter
    /// among the visitors the shop took on.
    fn straight_in(
        &self,
        cfg: &ShedConfig,
        admitted: Admitted,
        unix_now: u64,
        secure: bool,
    ) -> Entry {
        let counts = &self.pool.traffic.admission;
        counts.newcomers_in.fetch_add(1, Ordering::Relaxed);
        self.newcomer_in(cfg, admitted, unix_now, secure)
    }

    /// A new visitor: a page load goes through the room when the pool has one (straight
    /// in while nobody waits and the shop has room); anything else tries the shop, and
    /// while others wait is turned away (it would cut in line).
    async fn newcomer(
        self: &Rc<Self>,
        cfg: &ShedConfig,
        view: &impl RequestView,
        unix_now: u64,
        secure: bool,
        conn_info: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Entry, Answer> {
        let counts = &self.pool.traffic.admission;
        let room = self.room_parts();
        match room {
            Some(room) if is_page_load(view) => {
                return self
                    .through_room(cfg, room, view, unix_now, secure, conn_info, request_id)
                    .await;
            }
            // Not a visitor (a favicon, an API call beside a page): not counted as one.
            Some(room) if room.room.someone_waits() => {
                return Err(answers::shed(request_id));
            }
            _ => {}
        }
        match self.admit(cfg, shed::Class::Newcomer).await {
            Some(admitted) => Ok(self.straight_in(cfg, admitted, unix_now, secure)),
            None => {
                counts.newcomers_turned_away.fetch_add(1, Ordering::Relaxed);
                Err(answers::shed(request_id))
            }
        }
    }

    /// A newcomer's page load and the waiting room: the shop while nobody waits and it
    /// has room, else a place (or the holder's own), and in when the line reaches it.
    #[allow(clippy::too_many_arguments)]
    async fn through_room(
        self: &Rc<Self>,
        cfg: &ShedConfig,
        parts: RoomParts<'_>,
        view: &impl RequestView,
        unix_now: u64,
        secure: bool,
        conn_info: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Entry, Answer> {
        let ticket = ticket_of(view, parts.config, parts.signer, unix_now);
        let mut room = None;
        if ticket.is_none() && !parts.room.in_use() {
            if let Some(admitted) = self.admit(cfg, shed::Class::Newcomer).await {
                return Ok(self.straight_in(cfg, admitted, unix_now, secure));
            }
            // Just shed: no room now, whatever the count says a moment later.
            room = Some(Capacity::slots(0));
        }
        let room = room.unwrap_or_else(|| self.room_for_newcomers(cfg, parts.config.refresh));
        let now_ms = waiting::wall_ms();
        let fresh = Ticket {
            issued_ms: now_ms,
            nonce: fastrand::u64(..),
        };
        let at = (unix_now, now_ms, secure);
        match parts
            .room
            .visit(ticket, Instant::now(), now_ms, room, fresh)
        {
            Visit::Wait { ticket, place } => {
                Err(waiting_page(&parts, ticket, place, at, conn_info))
            }
            Visit::Full => Err(answers::shed(request_id)),
            Visit::Enter { ticket } => {
                self.come_in(cfg, &parts, ticket, at, conn_info, request_id)
                    .await
            }
        }
    }

    /// A visitor the room lets in: served, its place (if any) is spent and its ticket
    /// cleared. Let in from the line, its room is kept for it (the class of shoppers in);
    /// straight in (nobody waiting), it is a newcomer like any other. If the shop filled a
    /// moment later, a holder keeps its place at the front and is back at its next reload;
    /// a ticket another instance of the cluster let in already is a replay.
    async fn come_in(
        self: &Rc<Self>,
        cfg: &ShedConfig,
        parts: &RoomParts<'_>,
        ticket: Option<Ticket>,
        at: (u64, u64, bool),
        conn_info: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Entry, Answer> {
        let (unix_now, now_ms, secure) = at;
        // A holder let in is one of the shoppers in already (its room was counted when
        // the line let it in), and waits for room up to one reload (it would be back then
        // anyway): the front of the line is not sent back behind those it let in after.
        let (class, patience) = match ticket {
            Some(_) => (
                shed::Class::Admitted,
                parts.config.refresh.max(cfg.admitted_queue_timeout),
            ),
            None => (shed::Class::Newcomer, cfg.queue_timeout),
        };
        let Some(admitted) = self.admit_within(cfg, class, patience).await else {
            return Err(match ticket {
                Some(t) => waiting_page(parts, t, 1, at, conn_info),
                None => fresh_place(parts, at, conn_info, request_id),
            });
        };
        let Some(t) = ticket else {
            return Ok(self.straight_in(cfg, admitted, unix_now, secure));
        };
        let mut entry = self.newcomer_in(cfg, admitted, unix_now, secure);
        let expires = t.issued_ms / 1000 + parts.config.ticket_ttl.as_secs();
        // Spent here first (two page loads of one holder at once: one gets in), then
        // claimed across the cluster (used on another instance: a replay).
        let first_use = parts.room.spend(t, now_ms) && parts.room.claim(t, expires).await;
        if !first_use {
            parts.room.counters.replays.fetch_add(1, Ordering::Relaxed);
            return Err(fresh_place(parts, at, conn_info, request_id));
        }
        metrics::counter!(names::WAITING_ROOM_ADMITTED).increment(1);
        entry.queue_cookie =
            HeaderValue::from_str(&format!("{}=; Path=/; Max-Age=0", parts.config.cookie)).ok();
        Ok(entry)
    }

    /// Newcomers the shop has room for now: below the newcomers' share of the limit,
    /// counting requests waiting for room as taken; and what a holder let in is counted
    /// for until it is back: the load it will bring, what one shopper costs the shop
    /// (measured, see `waiting::SessionCost`; at least its first request, the blades'
    /// latency), spread over twice the reload (`refresh`) it comes back in. Counted
    /// whole for a whole reload, holders would let the line in one reload at a time
    /// (at two thirds of the shop's pace); not at all, a shop that grows by a node would
    /// let in twenty times what the node takes before their load showed.
    fn room_for_newcomers(&self, cfg: &ShedConfig, refresh: std::time::Duration) -> Capacity {
        let admission = &self.pool.traffic.admission;
        let table = self.pool.snapshot();
        let taken =
            admission.in_flight.load(Ordering::SeqCst) + admission.waiting.load(Ordering::SeqCst);
        let free =
            shed::capacity(cfg, table.eligible(), shed::Class::Newcomer).saturating_sub(taken);
        let (sum, n) = table
            .members()
            .iter()
            .filter(|m| m.state == crate::pool::State::InService)
            .fold((0.0, 0u32), |(sum, n), m| {
                (sum + m.backend.latency.get_ns(), n + 1)
            });
        let latency = if n == 0 {
            0.0
        } else {
            sum / f64::from(n) / 1e9
        };
        let cost = parts_cost(self).max(latency);
        Capacity {
            free,
            per_let_in: (cost / (2.0 * refresh.as_secs_f64()).max(0.001)).clamp(0.01, 1.0),
        }
    }

    fn room_parts(&self) -> Option<RoomParts<'_>> {
        match (
            &self.pool.traffic.waiting,
            &self.pool.settings().waiting_room,
            &self.queue_signer,
        ) {
            (Some(room), Some(config), Some(signer)) => Some(RoomParts {
                room,
                config,
                signer,
            }),
            _ => None,
        }
    }

    /// The waiting page's poll: the holder's place and wait, or that it may come in.
    /// `None` (forwarded as any path) when this pool has no waiting room.
    fn queue_poll(
        &self,
        view: &impl RequestView,
        unix_now: u64,
        conn_info: &ConnInfo,
    ) -> Option<Answer> {
        let parts = self.room_parts()?;
        let now_ms = waiting::wall_ms();
        let place = ticket_of(view, parts.config, parts.signer, unix_now)
            .and_then(|t| parts.room.place(t, now_ms));
        let wait = place.and_then(|(p, _)| parts.room.estimate(p, now_ms));
        let mut resp = answers::queue_status(place, wait);
        if !conn_info.h2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Some(resp)
    }

    /// Admits a request under the shedding limit, waiting up to the queue timeout. The
    /// wait is woken by a request giving its room back or by a pool change (a node coming
    /// into service), not by a timer.
    pub(super) async fn admit(&self, cfg: &ShedConfig, class: shed::Class) -> Option<Admitted> {
        let patience = match class {
            shed::Class::Newcomer => cfg.queue_timeout,
            shed::Class::Admitted | shed::Class::Priority => cfg.admitted_queue_timeout,
        };
        self.admit_within(cfg, class, patience).await
    }

    /// [`Self::admit`], waiting up to `patience` for room.
    async fn admit_within(
        &self,
        cfg: &ShedConfig,
        class: shed::Class,
        patience: std::time::Duration,
    ) -> Option<Admitted> {
        let admission = &self.pool.traffic.admission;
        let fits = || {
            shed::admits(
                cfg,
                admission.in_flight.load(Ordering::SeqCst),
                self.pool.snapshot().eligible(),
                class,
            )
        };
        if fits() {
            return Some(Admitted::new(admission.clone()));
        }
        // A guard: a request dropped while it waits (an HTTP/2 stream reset) is
        // uncounted too, or the queue would fill with ghosts and shed everyone.
        let (waiting, before) = shed::Waiting::start(admission);
        if before < cfg.queue_size {
            let deadline = tokio::time::Instant::now() + patience;
            let mut changes = self.pool.changes();
            loop {
                let room = admission.room.notified();
                let mut room = std::pin::pin!(room);
                // Registered before looking, so room freed in between still wakes us.
                room.as_mut().enable();
                changes.borrow_and_update();
                if fits() {
                    drop(waiting);
                    return Some(Admitted::new(admission.clone()));
                }
                tokio::select! {
                    _ = room => {}
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        drop(waiting);
        admission.shed.fetch_add(1, Ordering::Relaxed);
        let priority = class == shed::Class::Priority;
        metrics::counter!(names::SHED_TOTAL, "priority" => if priority { "true" } else { "false" }, "class" => class.label())
            .increment(1);
        None
    }
}

/// What one shopper let in costs the shop (request-slot seconds), as the room last
/// measured it; 0 before it is known.
fn parts_cost(fwd: &Forwarder) -> f64 {
    fwd.pool
        .traffic
        .waiting
        .as_ref()
        .map_or(0.0, |r| r.session_cost())
}

/// Surge's own answer, with the request id and HSTS.
fn own_answer(mut resp: Answer, request_id: &HeaderValue, conn_info: &ConnInfo) -> Answer {
    resp.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    if let Some(h) = &conn_info.hsts {
        resp.headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
    }
    resp
}

/// A page load: GET or HEAD accepting HTML (only those wait; an API client gets a 503).
fn is_page_load(view: &impl RequestView) -> bool {
    matches!(*view.method(), Method::GET | Method::HEAD)
        && view
            .values("accept")
            .any(|v| std::str::from_utf8(v).is_ok_and(|v| v.contains("text/html")))
}

/// The waiting page for the holder of `ticket` at `place`, with its ticket cookie. The
/// cookie expires when the ticket does, however often it is issued again. On HTTP/1 the
/// connection is closed: the holder is back in seconds, and a waiting crowd would
/// otherwise hold one idle connection each.
fn waiting_page(
    parts: &RoomParts<'_>,
    ticket: Ticket,
    place: usize,
    (unix_now, now_ms, secure): (u64, u64, bool),
    conn_info: &ConnInfo,
) -> Answer {
    let expiry = ticket.issued_ms / 1000 + parts.config.ticket_ttl.as_secs();
    let cookie = format!(
        "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        parts.config.cookie,
        parts.signer.issue_until(&ticket.subject(), expiry),
        expiry.saturating_sub(unix_now),
        if secure { "; Secure" } else { "" }
    );
    let cookie = HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""));
    let mut resp = answers::waiting(
        parts.config.page.as_deref(),
        place,
        parts.room.estimate(place, now_ms),
        parts.config.refresh,
        cookie,
    );
    if !conn_info.h2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A fresh place at the end of the line (the 503 when the line is at its bound).
fn fresh_place(
    parts: &RoomParts<'_>,
    at: (u64, u64, bool),
    conn_info: &ConnInfo,
    request_id: &HeaderValue,
) -> Answer {
    let fresh = Ticket {
        issued_ms: at.1,
        nonce: fastrand::u64(..),
    };
    match parts
        .room
        .visit(None, Instant::now(), at.1, Capacity::slots(0), fresh)
    {
        Visit::Wait { ticket, place } => waiting_page(parts, ticket, place, at, conn_info),
        _ => answers::shed(request_id),
    }
}

/// The ticket the request's queue cookie names, if this pool signed it and it has not
/// expired.
fn ticket_of(
    view: &impl RequestView,
    w: &WaitingRoomConfig,
    signer: &RouteSigner,
    unix_now: u64,
) -> Option<Ticket> {
    headers::cookie_of(view, &w.cookie)
        .and_then(|v| signer.verify(v, unix_now))
        .and_then(|v| Ticket::from_subject(v.backend))
}
