//! The proxy's single MQTT connection: options, and the dispatcher that drives the rumqttc
//! event loop and routes what arrives (replies to bridges, statuses to the registry).

use std::sync::Arc;
use std::time::Duration;

use pollen_proto::device::{DeviceStatus, ProxyStatus, Reply};
use pollen_proto::topics;
use prost::Message;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS, Request,
    Subscribe, SubscribeFilter,
};
use tokio_util::sync::CancellationToken;

use crate::ProxyConfig;
use crate::proxy::Shared;

/// QoS 1 messages the proxy may have unacknowledged at once. Every bridge may publish a
/// command in the same instant when a round starts; rumqttc's default (100) would serialise a
/// thousand-device round behind broker round trips.
const INFLIGHT: u16 = 1000;
/// Requests (publishes) buffered between bridges and the event loop before publishers wait.
pub(crate) const REQUEST_CAPACITY: usize = 4096;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest accepted device id, as the coordinator accepts client ids.
const MAX_DEVICE_ID_LEN: usize = 128;

/// The proxy's connection: a persistent session, so that replies published while the proxy
/// is away are queued by the broker and delivered when it comes back.
pub(crate) fn connect(config: &ProxyConfig) -> Result<(AsyncClient, EventLoop), crate::ProxyError> {
    let mut options: MqttOptions =
        pollen_proto::mqtt::mqtt_options(&config.broker, &config.client_id())?;
    options
        .set_clean_session(!config.persistent_session)
        .set_keep_alive(config.keep_alive)
        .set_inflight(INFLIGHT);
    if config.auto_shard {
        // What the broker announces for a proxy that dies without saying goodbye, so that the
        // others take its devices over.
        let will = ProxyStatus {
            proxy_id: config.proxy_id.clone(),
            online: false,
            heartbeat_ms: u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
            ..ProxyStatus::default()
        };
        options.set_last_will(LastWill::new(
            topics::proxy_status(&config.fleet, &config.proxy_id),
            will.encode_to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    Ok(pollen_proto::mqtt::client(options, REQUEST_CAPACITY))
}

/// What a message on a status topic says.
#[derive(Debug)]
pub enum StatusUpdate {
    /// An empty retained payload: the device's status was cleared.
    Cleared,
    Status(Box<DeviceStatus>),
    /// Undecodable, or not about the topic's device; logged.
    Malformed,
}

/// Decodes a status message of `device` received on `topic`, logging what is wrong with it.
pub fn decode_status(topic: &str, device: &str, payload: &[u8]) -> StatusUpdate {
    if payload.is_empty() {
        return StatusUpdate::Cleared;
    }
    match DeviceStatus::decode(payload) {
        Err(e) => {
            tracing::warn!(%topic, "status message dropped: it does not decode as DeviceStatus: {e}");
            StatusUpdate::Malformed
        }
        Ok(s) if s.device_id != device => {
            tracing::warn!(%topic, device_id = %s.device_id, "status message dropped: it names another device");
            StatusUpdate::Malformed
        }
        Ok(_)
            if device.len() > MAX_DEVICE_ID_LEN
                || topics::validate_id("device id", device).is_err() =>
        {
            tracing::warn!(%topic, "status message dropped: the device id cannot join a coordinator (at most 128 of [A-Za-z0-9_.-])");
            StatusUpdate::Malformed
        }
        Ok(s) => StatusUpdate::Status(Box::new(s)),
    }
}

/// Decodes a proxy's announcement received on `topic`, whose level is `identity`
/// (`pollen-proxy.<id>`): `Some(None)` when cleared, `None` (logged) when malformed.
pub fn decode_proxy_status(
    topic: &str,
    identity: &str,
    payload: &[u8],
) -> Option<Option<ProxyStatus>> {
    if payload.is_empty() {
        return identity
            .strip_prefix("pollen-proxy.")
            .is_some()
            .then_some(None);
    }
    match ProxyStatus::decode(payload) {
        Err(e) => {
            tracing::warn!(%topic, "proxy status dropped: it does not decode as ProxyStatus: {e}");
            None
        }
        Ok(s) if identity.strip_prefix("pollen-proxy.") != Some(s.proxy_id.as_str()) => {
            tracing::warn!(%topic, proxy_id = %s.proxy_id, "proxy status dropped: it names another proxy than its topic");
            None
        }
        Ok(s) => Some(Some(s)),
    }
}

/// Decodes a reply of `device` received on `topic`; `None` (logged) if it is malformed.
pub fn decode_reply(topic: &str, device: &str, payload: &[u8]) -> Option<Reply> {
    match Reply::decode(payload) {
        Err(e) => {
            tracing::warn!(%topic, "reply dropped: it does not decode as Reply: {e}");
            None
        }
        Ok(r) if r.device_id != device => {
            tracing::warn!(%topic, device_id = %r.device_id, request = %r.request_id, "reply dropped: it names another device than its topic");
            None
        }
        Ok(r) => Some(r),
    }
}

/// Drives the event loop until the proxy has disconnected (after shutdown) or `stop` fires.
/// Polling never stops on errors: rumqttc reconnects on the next poll, and replies queued by
/// the broker for the persistent session arrive then.
pub(crate) async fn run_dispatcher(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The proxies' announcements first: their retained messages then arrive before the
    // (possibly thousands of) retained device statuses.
    let mut filters = Vec::new();
    if shared.membership.is_some() {
        filters.push(topics::all_proxy_status(&shared.fleet));
    }
    filters.push(topics::all_replies(&shared.fleet));
    filters.push(topics::all_status(&shared.fleet));
    let mut backoff = BACKOFF_START;
    let mut connected_before = false;
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = stop.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = BACKOFF_START;
                if connected_before {
                    shared.stats.reconnects.inc();
                }
                connected_before = true;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                // A restarted broker may have forgotten the session's subscriptions. Queued
                // straight into the event loop: the request channel is shared with every
                // bridge's publishes and may be full, and only this task drains it.
                let subscribe = Subscribe::new_many(
                    filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                );
                eventloop.pending.push_back(Request::Subscribe(subscribe));
                shared.on_connection(true);
                if let Some((topic, payload)) = shared.announcement(true) {
                    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
                    publish.retain = true;
                    eventloop.pending.push_back(Request::Publish(publish));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => route(&shared, &p),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<&String> = ack
                    .return_codes
                    .iter()
                    .zip(&filters)
                    .filter(|(code, _)| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                    .map(|(_, filter)| filter)
                    .collect();
                if !refused.is_empty() {
                    shared
                        .stats
                        .subscriptions_refused
                        .inc_by(refused.len() as u64);
                    tracing::error!(
                        broker = %shared.broker_url,
                        ?refused,
                        "the broker refused the proxy's subscriptions: its ACL does not let this proxy's identity read them, so no reply or status will arrive (provision the proxy with `pollen fleet provision --proxies`)"
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                shared.on_connection(false);
                if shared.shutdown.is_cancelled() {
                    break;
                }
                tracing::warn!(broker = %shared.broker_url, "MQTT connection: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                    _ = shared.shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn route(shared: &Arc<Shared>, p: &rumqttc::Publish) {
    let Some((fleet, device, channel)) = topics::parse(&p.topic) else {
        return;
    };
    if fleet != shared.fleet {
        return;
    }
    match channel {
        "reply" => {
            // Every proxy of a sharded fleet hears every reply; another shard's device is
            // that shard's proxy's to count and route.
            if shared
                .selection
                .shard
                .is_some_and(|s| !crate::shard::owns(s, device))
                || !shared.owns(device, crate::now_unix_ms())
            {
                return;
            }
            shared.stats.replies_received.inc();
            match decode_reply(&p.topic, device, &p.payload) {
                Some(reply) => shared.route_reply(device, reply),
                None => {
                    shared.stats.replies_malformed.inc();
                }
            }
        }
        "status" => match decode_status(&p.topic, device, &p.payload) {
            StatusUpdate::Malformed => {
                shared.stats.status_malformed.inc();
            }
            update => shared.on_status(device, update, p.retain),
        },
        topics::PROXY_CHANNEL => match decode_proxy_status(&p.topic, device, &p.payload) {
            Some(status) => {
                let id = device.strip_prefix("pollen-proxy.").unwrap_or(device);
                shared.on_proxy_status(id, status.as_ref());
            }
            None => {
                shared.stats.status_malformed.inc();
            }
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_checked_against_their_topic() {
        let topic = "pollen/f/gw-1/status";
        assert!(matches!(
            decode_status(topic, "gw-1", b""),
            StatusUpdate::Cleared
        ));
        assert!(matches!(
            decode_status(topic, "gw-1", b"\xff\xff\xff"),
            StatusUpdate::Malformed
        ));
        let other = DeviceStatus {
            device_id: "gw-2".into(),
            online: true,
            ..DeviceStatus::default()
        };
        assert!(matches!(
            decode_status(topic, "gw-1", &other.encode_to_vec()),
            StatusUpdate::Malformed
        ));
        let own = DeviceStatus {
            device_id: "gw-1".into(),
            ..other
        };
        assert!(matches!(
            decode_status(topic, "gw-1", &own.encode_to_vec()),
            StatusUpdate::Status(_)
        ));
    }

    #[test]
    fn replies_naming_another_device_are_refused() {
        let reply = Reply {
            request_id: "x-1-1".into(),
            device_id: "gw-2".into(),
            ..Reply::default()
        };
        let topic = "pollen/f/gw-1/reply";
        assert!(decode_reply(topic, "gw-1", &reply.encode_to_vec()).is_none());
        assert!(decode_reply(topic, "gw-2", &reply.encode_to_vec()).is_some());
        assert!(decode_reply(topic, "gw-1", b"\x0a\xff").is_none());
    }
}
