//! What the agent puts on the wire besides the work itself: replies shrunk to the MQTT payload
//! limit, and its retained status.

use std::path::PathBuf;

use bytes::Bytes;
use pollen_proto::device::{DeviceStatus, Reply, reply::Body};
use pollen_proto::fleet::FailureCode;
use pollen_proto::limits::MAX_MQTT_PAYLOAD_BYTES;
use pollen_proto::now_unix_ms;
use pollen_proto::scalar::ScalarMap;
use prost::Message;

/// Longest failure or progress message kept when a reply must shrink to fit the payload limit.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [truncated]");
    }
}

/// Encodes a reply, shrinking it (metrics dropped, messages cut) if it would exceed the MQTT
/// payload limit.
pub fn encode_reply(mut reply: Reply) -> Bytes {
    let encoded = reply.encode_to_vec();
    if encoded.len() <= MAX_MQTT_PAYLOAD_BYTES {
        return encoded.into();
    }
    tracing::warn!(
        request_id = %reply.request_id,
        bytes = encoded.len(),
        "reply exceeds the {MAX_MQTT_PAYLOAD_BYTES}-byte MQTT payload limit; dropping its metrics and cutting its message"
    );
    match reply.body.as_mut() {
        Some(Body::Fit(fit)) => fit.metrics.clear(),
        Some(Body::Evaluate(evaluation)) => evaluation.metrics.clear(),
        Some(Body::Failure(failure)) => truncate(&mut failure.message, MAX_MESSAGE_BYTES),
        Some(Body::Progress(progress)) => truncate(&mut progress.message, MAX_MESSAGE_BYTES),
        Some(Body::Statistics(statistics)) => {
            // Nothing of it can go without making it wrong: say so instead.
            let channels = statistics.features.as_ref().map_or(0, |m| m.mean.len());
            reply.body = Some(Body::Failure(pollen_proto::fleet::Failure {
                request_id: 0,
                round: reply.round,
                code: FailureCode::DataMismatch as i32,
                message: format!(
                    "the statistics of {channels} feature channels do not fit the \
                     {MAX_MQTT_PAYLOAD_BYTES}-byte MQTT payload limit; use fewer channels or \
                     normalize = \"none\""
                ),
            }));
        }
        None => {}
    }
    let encoded = reply.encode_to_vec();
    // Request and device ids are bounded when they are accepted, so a shrunk reply fits.
    debug_assert!(encoded.len() <= MAX_MQTT_PAYLOAD_BYTES);
    encoded.into()
}

/// Everything about the device's status that does not change.
pub struct StatusInfo {
    pub device_id: String,
    pub fleet: String,
    pub model: String,
    pub num_examples: u64,
    pub data: Option<pollen_proto::fleet::DataSchema>,
    pub work_dir: Option<PathBuf>,
    pub properties: ScalarMap,
}

impl StatusInfo {
    pub fn status(&self, online: bool, properties: ScalarMap) -> DeviceStatus {
        let free_disk_bytes = self
            .work_dir
            .as_deref()
            .and_then(|dir| fs2::available_space(dir).ok())
            .unwrap_or(0);
        let mut all = self.properties.clone();
        all.extend(properties);
        DeviceStatus {
            device_id: self.device_id.clone(),
            online,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            num_examples: self.num_examples,
            model: self.model.clone(),
            free_disk_bytes,
            timestamp_unix_ms: now_unix_ms(),
            properties: all,
            data: self.data.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use pollen_proto::device::{EvaluateReply, FitReply};
    use pollen_proto::fleet::Failure;
    use pollen_proto::scalar;

    use super::*;

    fn reply(body: Body) -> Reply {
        Reply {
            request_id: "r".repeat(256),
            device_id: "d".repeat(128),
            round: 1,
            body: Some(body),
        }
    }

    #[test]
    fn oversized_replies_lose_their_metrics_but_keep_their_result() {
        let mut metrics = ScalarMap::new();
        for i in 0..2000 {
            metrics.insert(format!("metric_{i}"), scalar::f64(i as f64));
        }
        let fit = reply(Body::Fit(FitReply {
            sha256: "ab".repeat(32),
            size_bytes: 10,
            num_examples: 600,
            metrics: metrics.clone(),
            ..Default::default()
        }));
        let payload = encode_reply(fit);
        assert!(payload.len() <= MAX_MQTT_PAYLOAD_BYTES);
        let back = Reply::decode(payload.as_ref()).expect("decodes");
        match back.body {
            Some(Body::Fit(f)) => {
                assert!(f.metrics.is_empty());
                assert_eq!(f.num_examples, 600);
            }
            other => panic!("{other:?}"),
        }
        let evaluation = encode_reply(reply(Body::Evaluate(EvaluateReply {
            loss: 0.5,
            num_examples: 1,
            metrics,
        })));
        assert!(evaluation.len() <= MAX_MQTT_PAYLOAD_BYTES);
    }

    #[test]
    fn oversized_failure_messages_are_cut_on_a_character_boundary() {
        let failure = reply(Body::Failure(Failure {
            message: "é".repeat(20_000),
            ..Default::default()
        }));
        let back = Reply::decode(encode_reply(failure).as_ref()).expect("decodes");
        match back.body {
            Some(Body::Failure(f)) => assert!(f.message.ends_with("[truncated]")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn small_replies_are_sent_as_they_are() {
        let small = Reply {
            request_id: "r-1".into(),
            ..Default::default()
        };
        assert_eq!(encode_reply(small.clone()), small.encode_to_vec());
    }
}
