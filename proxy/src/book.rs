//! Request bookkeeping of one bridge, without I/O: which commands are open, which were closed
//! and how, and what each coordinator instruction or device reply turns into.
//!
//! The async bridge ([`crate::bridge`]) feeds it instructions, replies and the clock, and
//! carries out what it returns (publish a command, answer the coordinator, count).

use std::collections::{HashMap, VecDeque};

use pollen_proto::device::{BlobGet, Command, CommandKind, Reply, reply::Body as ReplyBody};
use pollen_proto::fleet::{
    BlobRef, ClientMessage, EvaluateRes, Failure, FailureCode, FitRes, ParametersRes, Progress,
    StatisticsRes, TaskFile, TaskRef, Upload, Weights, client_message::Msg as ClientMsg,
    server_message::Msg as ServerMsg, weights::Body as WeightsBody,
};
use pollen_proto::limits::MAX_MQTT_PAYLOAD_BYTES;
use prost::Message;

/// Closed request ids remembered per bridge, so that a second or late answer is recognised.
/// A device has at most a few requests in flight; 256 covers many rounds of them.
pub const CLOSED_MEMORY: usize = 256;

/// How a request was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The device answered (result or failure).
    Answered,
    /// The deadline passed first.
    TimedOut,
    /// The coordinator cancelled it, its stream ended, or the device went offline.
    Cancelled,
}

/// What to do about one coordinator instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum InstructionOutcome {
    /// Publish this command; the request stays open until answered, timed out or cancelled.
    Publish(Command),
    /// Answer the coordinator with this at once; nothing goes to the device.
    Reject(ClientMessage),
    /// The coordinator cancelled an open request: publish this CANCEL. The request is closed.
    Cancel(Command),
    /// Nothing to do: a cancel for a request that is not open, or a message that is not work.
    Ignore,
}

/// What to do about one device reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyOutcome {
    /// A final answer: send it to the coordinator. The request is closed.
    Answer(ClientMessage),
    /// Progress: send it to the coordinator. The request stays open.
    Progress(ClientMessage),
    /// The request had already been answered; drop.
    Duplicate,
    /// The request had timed out or been cancelled; drop.
    Late,
    /// No such request (never sent, or forgotten); drop.
    Unknown,
    /// The reply does not fit its request; drop. Says why.
    Malformed(String),
}

/// A request whose deadline passed: tell the coordinator, and tell the device to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Closing {
    pub failure: ClientMessage,
    pub cancel: Command,
}

#[derive(Debug, Clone)]
struct Open {
    coordinator_id: u64,
    kind: CommandKind,
    run_id: String,
    round: u64,
    /// 0 = no deadline (get-parameters): the coordinator's own timeout cancels it.
    deadline_unix_ms: u64,
    /// Where the device's upload lands; named in the answer's `BlobRef`.
    upload_location: String,
}

/// Open and recently closed requests of one device bridge.
#[derive(Debug)]
pub struct RequestBook {
    device_id: String,
    /// Prefix of every command id: unique per proxy process and Join session, so that ids never
    /// repeat across proxy restarts or coordinator runs (coordinators restart their ids at 1).
    prefix: String,
    open: HashMap<String, Open>,
    closed: HashMap<String, Closed>,
    closed_order: VecDeque<String>,
}

impl RequestBook {
    pub fn new(device_id: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            prefix: prefix.into(),
            open: HashMap::new(),
            closed: HashMap::new(),
            closed_order: VecDeque::new(),
        }
    }

    /// Starts a new Join session: later commands get ids under `prefix`. Closed ids of
    /// earlier sessions are still remembered.
    pub fn set_prefix(&mut self, prefix: impl Into<String>) {
        self.prefix = prefix.into();
    }

    #[cfg(test)]
    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    /// The earliest deadline of an open request, in Unix milliseconds.
    pub fn next_deadline(&self) -> Option<u64> {
        self.open
            .values()
            .map(|o| o.deadline_unix_ms)
            .filter(|&d| d > 0)
            .min()
    }

    /// Turns a coordinator instruction into a command, a rejection or a cancel.
    pub fn instruct(&mut self, msg: ServerMsg) -> InstructionOutcome {
        match msg {
            ServerMsg::Fit(ins) => {
                let pending = Open {
                    coordinator_id: ins.request_id,
                    kind: CommandKind::Fit,
                    run_id: ins.run_id,
                    round: ins.round,
                    deadline_unix_ms: ins.deadline_unix_ms,
                    upload_location: String::new(),
                };
                self.open_command(
                    pending,
                    ins.task.as_ref(),
                    ins.weights.as_ref(),
                    ins.upload.as_ref(),
                    ins.config,
                )
            }
            ServerMsg::Evaluate(ins) => {
                let pending = Open {
                    coordinator_id: ins.request_id,
                    kind: CommandKind::Evaluate,
                    run_id: ins.run_id,
                    round: ins.round,
                    deadline_unix_ms: ins.deadline_unix_ms,
                    upload_location: String::new(),
                };
                self.open_command(
                    pending,
                    ins.task.as_ref(),
                    ins.weights.as_ref(),
                    None,
                    ins.config,
                )
            }
            ServerMsg::GetParameters(ins) => {
                let pending = Open {
                    coordinator_id: ins.request_id,
                    kind: CommandKind::GetParameters,
                    run_id: ins.run_id,
                    round: 0,
                    deadline_unix_ms: 0,
                    upload_location: String::new(),
                };
                self.open_command(
                    pending,
                    ins.task.as_ref(),
                    None,
                    ins.upload.as_ref(),
                    ins.config,
                )
            }
            ServerMsg::Statistics(ins) => {
                let pending = Open {
                    coordinator_id: ins.request_id,
                    kind: CommandKind::Statistics,
                    run_id: ins.run_id,
                    round: 0,
                    deadline_unix_ms: ins.deadline_unix_ms,
                    upload_location: String::new(),
                };
                self.open_command(pending, ins.task.as_ref(), None, None, ins.config)
            }
            ServerMsg::Cancel(cancel) => {
                let found = self
                    .open
                    .iter()
                    .find(|(_, o)| o.coordinator_id == cancel.request_id)
                    .map(|(id, _)| id.clone());
                match found.and_then(|id| self.take(&id, Closed::Cancelled)) {
                    Some((id, open)) => InstructionOutcome::Cancel(cancel_command(id, open)),
                    None => InstructionOutcome::Ignore,
                }
            }
            ServerMsg::Welcome(_) | ServerMsg::Stop(_) => InstructionOutcome::Ignore,
        }
    }

    fn open_command(
        &mut self,
        mut pending: Open,
        task: Option<&TaskRef>,
        weights: Option<&Weights>,
        upload: Option<&Upload>,
        config: pollen_proto::scalar::ScalarMap,
    ) -> InstructionOutcome {
        // A device reads the task manifest and its files like the weights: by presigned URL,
        // never inline.
        let task = match task {
            None => None,
            Some(t) if !t.url.is_empty() && t.files.iter().all(|f| !f.url.is_empty()) => {
                Some(TaskRef {
                    sha256: t.sha256.clone(),
                    size_bytes: t.size_bytes,
                    url: t.url.clone(),
                    location: String::new(),
                    inline: Default::default(),
                    files: t
                        .files
                        .iter()
                        .map(|f| TaskFile {
                            sha256: f.sha256.clone(),
                            size_bytes: f.size_bytes,
                            url: f.url.clone(),
                            location: String::new(),
                            inline: Default::default(),
                        })
                        .collect(),
                })
            }
            Some(_) => return self.reject_by_value(&pending),
        };
        let global_weights = match (pending.kind, weights.and_then(|w| w.body.as_ref())) {
            (CommandKind::GetParameters | CommandKind::Statistics, _) => None,
            (_, Some(WeightsBody::Reference(r))) if !r.url.is_empty() => Some(BlobGet {
                url: r.url.clone(),
                sha256: r.sha256.clone(),
                size_bytes: r.size_bytes,
                codec: r.codec,
            }),
            _ => return self.reject_by_value(&pending),
        };
        let upload_url = match (pending.kind, upload) {
            (CommandKind::Evaluate | CommandKind::Statistics, _) => String::new(),
            (_, Some(u)) if !u.url.is_empty() && !u.location.is_empty() => {
                pending.upload_location = u.location.clone();
                u.url.clone()
            }
            _ => return self.reject_by_value(&pending),
        };
        let request_id = format!("{}-{}", self.prefix, pending.coordinator_id);
        let command = Command {
            request_id: request_id.clone(),
            kind: pending.kind as i32,
            run_id: pending.run_id.clone(),
            round: pending.round,
            global_weights,
            upload_url,
            config,
            deadline_unix_ms: pending.deadline_unix_ms,
            task,
        };
        let size = command.encoded_len();
        if size > MAX_MQTT_PAYLOAD_BYTES {
            return InstructionOutcome::Reject(failure(
                &pending,
                FailureCode::BadInstruction,
                format!(
                    "the command for device {} is {size} bytes, over the MQTT payload limit of \
                     {MAX_MQTT_PAYLOAD_BYTES}; shorten the config or the presigned URLs",
                    self.device_id
                ),
            ));
        }
        self.open.insert(request_id, pending);
        InstructionOutcome::Publish(command)
    }

    fn reject_by_value(&self, pending: &Open) -> InstructionOutcome {
        InstructionOutcome::Reject(failure(
            pending,
            FailureCode::BadInstruction,
            format!(
                "device {} is reached over MQTT and needs weights and task manifests by \
                 reference; run the coordinator with object storage",
                self.device_id
            ),
        ))
    }

    /// Matches a device reply to its open request. The caller has checked that the reply came
    /// from this bridge's device.
    pub fn on_reply(&mut self, reply: Reply) -> ReplyOutcome {
        let Some(open) = self.open.get(&reply.request_id) else {
            return match self.closed.get(&reply.request_id) {
                Some(Closed::Answered) => ReplyOutcome::Duplicate,
                Some(Closed::TimedOut | Closed::Cancelled) => ReplyOutcome::Late,
                None => ReplyOutcome::Unknown,
            };
        };
        let (request_id, round) = (open.coordinator_id, open.round);
        let msg = match (reply.body, open.kind) {
            (None, _) => return ReplyOutcome::Malformed("reply has no body".into()),
            (Some(ReplyBody::Progress(p)), _) => {
                let fraction = if p.fraction.is_nan() {
                    0.0
                } else {
                    p.fraction.clamp(0.0, 1.0)
                };
                return ReplyOutcome::Progress(ClientMessage {
                    msg: Some(ClientMsg::Progress(Progress {
                        request_id,
                        round,
                        fraction,
                        message: p.message,
                    })),
                });
            }
            (Some(ReplyBody::Failure(f)), _) => {
                let code = match FailureCode::try_from(f.code) {
                    Ok(FailureCode::Unspecified) | Err(_) => FailureCode::TrainingError,
                    Ok(code) => code,
                };
                ClientMsg::Failure(Failure {
                    request_id,
                    round,
                    code: code as i32,
                    message: f.message,
                })
            }
            (Some(ReplyBody::Fit(fit)), CommandKind::Fit) => ClientMsg::Fit(FitRes {
                request_id,
                round,
                weights: Some(reference(&open.upload_location, &fit)),
                num_examples: fit.num_examples,
                metrics: fit.metrics,
            }),
            (Some(ReplyBody::Fit(fit)), CommandKind::GetParameters) => {
                ClientMsg::Parameters(ParametersRes {
                    request_id,
                    weights: Some(reference(&open.upload_location, &fit)),
                })
            }
            (Some(ReplyBody::Evaluate(e)), CommandKind::Evaluate) => {
                ClientMsg::Evaluate(EvaluateRes {
                    request_id,
                    round,
                    loss: e.loss,
                    num_examples: e.num_examples,
                    metrics: e.metrics,
                })
            }
            (Some(ReplyBody::Statistics(statistics)), CommandKind::Statistics) => {
                ClientMsg::Statistics(StatisticsRes {
                    request_id,
                    statistics: Some(statistics),
                })
            }
            (Some(_), kind) => {
                return ReplyOutcome::Malformed(format!(
                    "reply body does not answer a {} command",
                    kind_name(kind)
                ));
            }
        };
        self.take(&reply.request_id, Closed::Answered);
        ReplyOutcome::Answer(ClientMessage { msg: Some(msg) })
    }

    /// Closes every open request whose deadline is at or before `now_unix_ms`.
    pub fn expire(&mut self, now_unix_ms: u64) -> Vec<Closing> {
        let mut due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| o.deadline_unix_ms > 0 && o.deadline_unix_ms <= now_unix_ms)
            .map(|(id, _)| id.clone())
            .collect();
        due.sort();
        let taken: Vec<(String, Open)> = due
            .iter()
            .filter_map(|id| self.take(id, Closed::TimedOut))
            .collect();
        taken
            .into_iter()
            .map(|(id, open)| {
                let message = format!(
                    "device {} did not answer {} for round {} by its deadline",
                    self.device_id,
                    kind_name(open.kind),
                    open.round
                );
                Closing {
                    failure: failure(&open, FailureCode::Timeout, message),
                    cancel: cancel_command(id, open),
                }
            })
            .collect()
    }

    /// Closes every open request without answering the coordinator (its stream ended or it
    /// sent Stop); returns the CANCELs to publish.
    pub fn cancel_all(&mut self) -> Vec<Command> {
        self.drain_open()
            .into_iter()
            .map(|(id, open)| cancel_command(id, open))
            .collect()
    }

    /// Closes every open request, failing each with `code` towards the coordinator (e.g. the
    /// device went offline); `why` completes "device <d> ...".
    pub fn fail_all(&mut self, code: FailureCode, why: &str) -> Vec<Closing> {
        let device = self.device_id.clone();
        self.drain_open()
            .into_iter()
            .map(|(id, open)| {
                let message = format!(
                    "device {device} {why} with {} for round {} open",
                    kind_name(open.kind),
                    open.round
                );
                Closing {
                    failure: failure(&open, code, message),
                    cancel: cancel_command(id, open),
                }
            })
            .collect()
    }

    /// Closes every open request as cancelled, in id order.
    fn drain_open(&mut self) -> Vec<(String, Open)> {
        let mut ids: Vec<String> = self.open.keys().cloned().collect();
        ids.sort();
        ids.iter()
            .filter_map(|id| self.take(id, Closed::Cancelled))
            .collect()
    }

    /// Moves an open request to the closed memory; `None` if `id` is not open.
    fn take(&mut self, id: &str, how: Closed) -> Option<(String, Open)> {
        let (id, open) = self.open.remove_entry(id)?;
        if self.closed.insert(id.clone(), how).is_none() {
            self.closed_order.push_back(id.clone());
        }
        while self.closed_order.len() > CLOSED_MEMORY {
            if let Some(old) = self.closed_order.pop_front() {
                self.closed.remove(&old);
            }
        }
        Some((id, open))
    }
}

/// Lower-case name of a command kind, for messages.
pub fn kind_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Fit => "fit",
        CommandKind::Evaluate => "evaluate",
        CommandKind::GetParameters => "get-parameters",
        CommandKind::Statistics => "statistics",
        CommandKind::Cancel => "cancel",
        CommandKind::Unspecified => "an unspecified command",
    }
}

fn failure(open: &Open, code: FailureCode, message: String) -> ClientMessage {
    ClientMessage {
        msg: Some(ClientMsg::Failure(Failure {
            request_id: open.coordinator_id,
            round: open.round,
            code: code as i32,
            message,
        })),
    }
}

fn cancel_command(request_id: String, open: Open) -> Command {
    Command {
        request_id,
        kind: CommandKind::Cancel as i32,
        run_id: open.run_id,
        round: open.round,
        ..Command::default()
    }
}

/// The device's upload, named by the key the coordinator chose for it.
fn reference(location: &str, fit: &pollen_proto::device::FitReply) -> Weights {
    Weights {
        body: Some(WeightsBody::Reference(BlobRef {
            location: location.to_string(),
            sha256: fit.sha256.clone(),
            size_bytes: fit.size_bytes,
            codec: fit.codec,
            url: String::new(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use pollen_proto::device::{EvaluateReply, FitReply};
    use pollen_proto::fleet::{
        Cancel, Codec, EvaluateIns, FitIns, GetParametersIns, InlineBlob, Scalar,
    };
    use pollen_proto::scalar;

    use super::*;

    const DEVICE: &str = "gw-1";

    fn book() -> RequestBook {
        RequestBook::new(DEVICE, "abcd-1")
    }

    fn by_reference() -> Weights {
        Weights {
            body: Some(WeightsBody::Reference(BlobRef {
                location: "runs/r1/round-0003/global.safetensors".into(),
                sha256: "aa".repeat(32),
                size_bytes: 1234,
                codec: Codec::SafetensorsF32 as i32,
                url: "http://s3.local/global?sig=1".into(),
            })),
        }
    }

    fn upload() -> Upload {
        Upload {
            location: "runs/r1/round-0003/gw-1.safetensors".into(),
            url: "http://s3.local/gw-1?sig=2".into(),
        }
    }

    fn fit_ins(request_id: u64, deadline_unix_ms: u64) -> ServerMsg {
        ServerMsg::Fit(FitIns {
            request_id,
            round: 3,
            weights: Some(by_reference()),
            config: [("epochs".to_string(), scalar::int(2))].into(),
            deadline_unix_ms,
            upload: Some(upload()),
            run_id: "r1".into(),
            task: Some(task()),
        })
    }

    fn task() -> TaskRef {
        TaskRef {
            sha256: "cc".repeat(32),
            size_bytes: 1200,
            location: "runs/r1/task-cccccccccccccccc.json".into(),
            url: "http://s3.test/bucket/runs/r1/task.json?X-Amz-Signature=get".into(),
            inline: Default::default(),
            files: Vec::new(),
        }
    }

    fn fit_reply(request_id: &str) -> Reply {
        Reply {
            request_id: request_id.into(),
            device_id: DEVICE.into(),
            round: 3,
            body: Some(ReplyBody::Fit(FitReply {
                sha256: "bb".repeat(32),
                size_bytes: 99,
                codec: Codec::SafetensorsF32 as i32,
                num_examples: 600,
                metrics: [("loss".to_string(), scalar::f64(0.5))].into(),
            })),
        }
    }

    fn published(outcome: InstructionOutcome) -> Command {
        match outcome {
            InstructionOutcome::Publish(c) => c,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    fn failure_of(msg: &ClientMessage) -> &Failure {
        match &msg.msg {
            Some(ClientMsg::Failure(f)) => f,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_fit_with_urls_becomes_a_command_carrying_them() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        assert_eq!(cmd.request_id, "abcd-1-7");
        assert_eq!(cmd.kind, CommandKind::Fit as i32);
        assert_eq!((cmd.run_id.as_str(), cmd.round), ("r1", 3));
        let get = cmd.global_weights.expect("global weights");
        assert_eq!(get.url, "http://s3.local/global?sig=1");
        assert_eq!((get.size_bytes, get.sha256.len()), (1234, 64));
        assert_eq!(cmd.upload_url, "http://s3.local/gw-1?sig=2");
        assert_eq!(cmd.deadline_unix_ms, 5_000);
        assert_eq!(
            cmd.config.get("epochs").and_then(scalar::as_i64),
            Some(2),
            "config is copied"
        );
        assert_eq!(book.open_len(), 1);
        assert_eq!(book.next_deadline(), Some(5_000));
    }

    #[test]
    fn a_fit_reply_becomes_a_fit_res_naming_the_upload_location() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        let ReplyOutcome::Answer(msg) = book.on_reply(fit_reply(&cmd.request_id)) else {
            panic!("expected an answer");
        };
        let Some(ClientMsg::Fit(res)) = msg.msg else {
            panic!("expected FitRes");
        };
        assert_eq!((res.request_id, res.round, res.num_examples), (7, 3, 600));
        let Some(WeightsBody::Reference(r)) = res.weights.and_then(|w| w.body) else {
            panic!("expected a reference");
        };
        assert_eq!(r.location, upload().location);
        assert_eq!((r.size_bytes, r.url.as_str()), (99, ""));
        assert_eq!(r.sha256, "bb".repeat(32));
        assert_eq!(book.open_len(), 0);
    }

    #[test]
    fn a_second_answer_is_a_duplicate_and_an_unknown_id_is_unknown() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        assert!(matches!(
            book.on_reply(fit_reply(&cmd.request_id)),
            ReplyOutcome::Answer(_)
        ));
        assert_eq!(
            book.on_reply(fit_reply(&cmd.request_id)),
            ReplyOutcome::Duplicate
        );
        assert_eq!(book.on_reply(fit_reply("abcd-1-99")), ReplyOutcome::Unknown);
        assert_eq!(book.on_reply(fit_reply("other-1-7")), ReplyOutcome::Unknown);
    }

    #[test]
    fn a_passed_deadline_fails_the_request_with_timeout_and_cancels_it() {
        let mut book = book();
        let early = published(book.instruct(fit_ins(7, 5_000)));
        let later = published(book.instruct(fit_ins(8, 9_000)));
        assert!(book.expire(4_999).is_empty());
        let closing = book.expire(5_000);
        assert_eq!(closing.len(), 1);
        let f = failure_of(&closing[0].failure);
        assert_eq!((f.request_id, f.round), (7, 3));
        assert_eq!(f.code, FailureCode::Timeout as i32);
        assert_eq!(
            f.message,
            "device gw-1 did not answer fit for round 3 by its deadline"
        );
        assert_eq!(closing[0].cancel.kind, CommandKind::Cancel as i32);
        assert_eq!(closing[0].cancel.request_id, early.request_id);
        assert_eq!(book.next_deadline(), Some(9_000));
        assert_eq!(
            book.on_reply(fit_reply(&early.request_id)),
            ReplyOutcome::Late
        );
        assert!(matches!(
            book.on_reply(fit_reply(&later.request_id)),
            ReplyOutcome::Answer(_)
        ));
    }

    #[test]
    fn a_coordinator_cancel_publishes_cancel_and_later_replies_are_late() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        let cancel = ServerMsg::Cancel(Cancel {
            request_id: 7,
            round: 3,
        });
        let InstructionOutcome::Cancel(c) = book.instruct(cancel.clone()) else {
            panic!("expected a cancel");
        };
        assert_eq!(c.request_id, cmd.request_id);
        assert_eq!(c.kind, CommandKind::Cancel as i32);
        assert_eq!(book.instruct(cancel), InstructionOutcome::Ignore);
        assert_eq!(
            book.on_reply(fit_reply(&cmd.request_id)),
            ReplyOutcome::Late
        );
        assert!(book.expire(u64::MAX).is_empty());
    }

    #[test]
    fn inline_weights_or_missing_urls_are_refused_without_a_command() {
        let mut book = book();
        let inline = ServerMsg::Fit(FitIns {
            request_id: 1,
            round: 2,
            weights: Some(Weights {
                body: Some(WeightsBody::Inline(InlineBlob::default())),
            }),
            upload: Some(upload()),
            ..FitIns::default()
        });
        let no_upload = ServerMsg::Fit(FitIns {
            request_id: 2,
            round: 2,
            weights: Some(by_reference()),
            ..FitIns::default()
        });
        let no_get_url = ServerMsg::Evaluate(EvaluateIns {
            request_id: 3,
            round: 2,
            weights: Some(Weights {
                body: Some(WeightsBody::Reference(BlobRef::default())),
            }),
            ..EvaluateIns::default()
        });
        let params_no_upload = ServerMsg::GetParameters(GetParametersIns {
            request_id: 4,
            ..GetParametersIns::default()
        });
        for (ins, id) in [
            (inline, 1),
            (no_upload, 2),
            (no_get_url, 3),
            (params_no_upload, 4),
        ] {
            let InstructionOutcome::Reject(msg) = book.instruct(ins) else {
                panic!("request {id} should be refused");
            };
            let f = failure_of(&msg);
            assert_eq!(f.request_id, id);
            assert_eq!(f.code, FailureCode::BadInstruction as i32);
            assert_eq!(
                f.message,
                "device gw-1 is reached over MQTT and needs weights and task manifests by \
                 reference; run the coordinator with object storage"
            );
        }
        assert_eq!(book.open_len(), 0);
    }

    #[test]
    fn an_oversized_command_is_refused() {
        let mut book = book();
        let ServerMsg::Fit(mut ins) = fit_ins(1, 0) else {
            unreachable!("fit_ins builds a fit")
        };
        let big = Scalar {
            value: Some(pollen_proto::fleet::scalar::Value::String(
                "x".repeat(MAX_MQTT_PAYLOAD_BYTES),
            )),
        };
        ins.config.insert("blob".into(), big);
        let InstructionOutcome::Reject(msg) = book.instruct(ServerMsg::Fit(ins)) else {
            panic!("expected a rejection");
        };
        assert!(failure_of(&msg).message.contains("MQTT payload limit"));
    }

    #[test]
    fn get_parameters_and_evaluate_answers_are_translated() {
        let mut book = book();
        let params = published(book.instruct(ServerMsg::GetParameters(GetParametersIns {
            request_id: 1,
            upload: Some(upload()),
            run_id: "r1".into(),
            ..GetParametersIns::default()
        })));
        assert!(params.global_weights.is_none());
        assert_eq!(params.kind, CommandKind::GetParameters as i32);
        assert_eq!(book.next_deadline(), None, "get-parameters has no deadline");
        let ReplyOutcome::Answer(msg) = book.on_reply(fit_reply(&params.request_id)) else {
            panic!("expected an answer");
        };
        let Some(ClientMsg::Parameters(res)) = msg.msg else {
            panic!("expected ParametersRes");
        };
        assert_eq!(res.request_id, 1);

        let eval = published(book.instruct(ServerMsg::Evaluate(EvaluateIns {
            request_id: 2,
            round: 4,
            weights: Some(by_reference()),
            deadline_unix_ms: 10,
            ..EvaluateIns::default()
        })));
        assert!(eval.upload_url.is_empty());
        let wrong = book.on_reply(fit_reply(&eval.request_id));
        assert!(matches!(wrong, ReplyOutcome::Malformed(_)), "{wrong:?}");
        let reply = Reply {
            request_id: eval.request_id.clone(),
            device_id: DEVICE.into(),
            round: 4,
            body: Some(ReplyBody::Evaluate(EvaluateReply {
                loss: 0.25,
                num_examples: 100,
                metrics: Default::default(),
            })),
        };
        let ReplyOutcome::Answer(msg) = book.on_reply(reply) else {
            panic!("expected an answer");
        };
        let Some(ClientMsg::Evaluate(res)) = msg.msg else {
            panic!("expected EvaluateRes");
        };
        assert_eq!((res.request_id, res.round, res.num_examples), (2, 4, 100));
    }

    #[test]
    fn progress_is_forwarded_and_keeps_the_request_open() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        let progress = Reply {
            request_id: cmd.request_id.clone(),
            device_id: DEVICE.into(),
            round: 3,
            body: Some(ReplyBody::Progress(Progress {
                request_id: 0,
                round: 0,
                fraction: 7.0,
                message: "epoch 1".into(),
            })),
        };
        let ReplyOutcome::Progress(msg) = book.on_reply(progress) else {
            panic!("expected progress");
        };
        let Some(ClientMsg::Progress(p)) = msg.msg else {
            panic!("expected Progress");
        };
        assert_eq!((p.request_id, p.round, p.fraction), (7, 3, 1.0));
        assert_eq!(book.open_len(), 1);
    }

    #[test]
    fn a_device_failure_is_forwarded_with_the_coordinator_ids() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(7, 5_000)));
        let reply = Reply {
            request_id: cmd.request_id.clone(),
            device_id: DEVICE.into(),
            round: 3,
            body: Some(ReplyBody::Failure(Failure {
                request_id: 0,
                round: 0,
                code: FailureCode::BlobTransfer as i32,
                message: "GET returned 403".into(),
            })),
        };
        let ReplyOutcome::Answer(msg) = book.on_reply(reply) else {
            panic!("expected an answer");
        };
        let f = failure_of(&msg);
        assert_eq!((f.request_id, f.round), (7, 3));
        assert_eq!(f.code, FailureCode::BlobTransfer as i32);
    }

    #[test]
    fn failing_all_closes_everything_and_stream_end_cancels_silently() {
        let mut book = book();
        let a = published(book.instruct(fit_ins(1, 5_000)));
        published(book.instruct(fit_ins(2, 5_000)));
        let closing = book.fail_all(FailureCode::DeviceOffline, "went offline");
        assert_eq!(closing.len(), 2);
        let f = failure_of(&closing[0].failure);
        assert_eq!(f.code, FailureCode::DeviceOffline as i32);
        assert_eq!(
            f.message,
            "device gw-1 went offline with fit for round 3 open"
        );
        assert_eq!(book.on_reply(fit_reply(&a.request_id)), ReplyOutcome::Late);

        book.set_prefix("abcd-2");
        let c = published(book.instruct(fit_ins(1, 5_000)));
        assert_eq!(c.request_id, "abcd-2-1", "a new session never reuses ids");
        let cancels = book.cancel_all();
        assert_eq!(cancels.len(), 1);
        assert_eq!(cancels[0].request_id, c.request_id);
        assert_eq!(book.open_len(), 0);
    }

    #[test]
    fn closed_ids_are_remembered_up_to_a_bound() {
        let mut book = book();
        let first = published(book.instruct(fit_ins(0, 0)));
        book.cancel_all();
        for id in 1..=CLOSED_MEMORY as u64 {
            published(book.instruct(fit_ins(id, 0)));
            book.cancel_all();
        }
        assert_eq!(
            book.on_reply(fit_reply(&first.request_id)),
            ReplyOutcome::Unknown
        );
        assert_eq!(book.on_reply(fit_reply("abcd-1-1")), ReplyOutcome::Late);
    }

    #[test]
    fn a_task_manifest_reaches_the_device_by_url_and_never_inline() {
        let mut book = book();
        let cmd = published(book.instruct(fit_ins(1, 10_000)));
        let sent = cmd.task.expect("task");
        assert_eq!(sent.url, task().url);
        assert_eq!(sent.sha256, task().sha256);
        // The device needs the URL and digest, not the store's key.
        assert!(sent.location.is_empty());
        let ServerMsg::Fit(mut inline) = fit_ins(2, 10_000) else {
            unreachable!()
        };
        inline.task = Some(TaskRef {
            url: String::new(),
            inline: vec![b'{', b'}'].into(),
            ..task()
        });
        assert!(matches!(
            book.instruct(ServerMsg::Fit(inline)),
            InstructionOutcome::Reject(_)
        ));
    }

    #[test]
    fn statistics_go_to_the_device_and_come_back_to_the_coordinator() {
        use pollen_proto::fleet::{Moments, Statistics, StatisticsIns};
        let mut book = book();
        let cmd = published(book.instruct(ServerMsg::Statistics(StatisticsIns {
            request_id: 7,
            task: Some(task()),
            config: Default::default(),
            deadline_unix_ms: 10_000,
            run_id: "r1".into(),
        })));
        assert_eq!(cmd.kind, CommandKind::Statistics as i32);
        assert!(cmd.global_weights.is_none() && cmd.upload_url.is_empty());
        let stats = Statistics {
            num_examples: 5,
            features: Some(Moments {
                count: 5,
                mean: vec![1.0],
                m2: vec![2.0],
                min: vec![0.0],
                max: vec![3.0],
            }),
            ..Default::default()
        };
        let reply = Reply {
            request_id: cmd.request_id.clone(),
            device_id: DEVICE.into(),
            round: 0,
            body: Some(ReplyBody::Statistics(stats.clone())),
        };
        match book.on_reply(reply) {
            ReplyOutcome::Answer(ClientMessage {
                msg: Some(ClientMsg::Statistics(res)),
            }) => {
                assert_eq!(res.request_id, 7);
                assert_eq!(res.statistics, Some(stats));
            }
            other => panic!("{other:?}"),
        }
    }
}
