//! Expert agents: answer a routed query with streaming generation.
//!
//! An expert is configuration (name, description, system prompt, generation
//! settings) plus a model slot. Retrieved passages, when a retriever supplies
//! them, go into the system prompt with citation ids `[1]`, `[2]`, ...

use std::sync::Arc;

use crate::config::ExpertSpec;
use crate::engine::{ChatMessage, GenerateParams, Role};
use crate::models::slots::{ServedModel, Slot};
use crate::retrieval::Passage;

/// One expert agent.
pub struct ExpertAgent {
    spec: ExpertSpec,
    slot: Arc<Slot>,
}

/// Most stop sequences a request may set.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in characters.
pub const MAX_STOP_CHARS: usize = 64;

/// Per-request overrides of an expert's generation settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Cap on new tokens (never above the expert's own cap).
    pub max_tokens: Option<u32>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Generation stops before any of these strings (not included in the answer).
    pub stop: Vec<String>,
    /// Seed of the sampler: the same seed, prompt and settings give the same answer.
    pub seed: Option<u64>,
}

impl Overrides {
    /// Refuse values no expert can use: `Err((field, what to fix))`.
    ///
    /// # Errors
    /// `max_tokens` of 0, a temperature that is negative, NaN or infinite.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_tokens == Some(0) {
            return Err((
                "max_tokens",
                "must be at least 1 (leave it unset for the expert's default)".into(),
            ));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return Err((
                "temperature",
                format!("is {t}; use a finite number >= 0 (0 = greedy, unset = the expert's default)"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err((
                "top_p",
                format!("is {p}; use a number in (0, 1] (1 = no nucleus cut, unset = the expert's default)"),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err((
                "stop",
                format!("has {} sequences; the limit is {MAX_STOP_SEQUENCES}", self.stop.len()),
            ));
        }
        if let Some(bad) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
        {
            let len = bad.chars().count();
            return Err((
                "stop",
                format!("holds a sequence of {len} characters; each must be 1 to {MAX_STOP_CHARS} characters"),
            ));
        }
        Ok(())
    }
}

impl ExpertAgent {
    /// An expert answering with the model in `slot`.
    pub fn new(spec: ExpertSpec, slot: Arc<Slot>) -> Self {
        Self { spec, slot }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The model serving it now; hold the `Arc` for the whole answer.
    pub fn model(&self) -> Arc<ServedModel> {
        self.slot.current()
    }

    /// The chat prompt for `query`, grounded on `passages`.
    pub fn prompt(&self, query: &str, passages: &[Passage]) -> Vec<ChatMessage> {
        self.conversation_prompt(&[], query, passages)
    }

    /// The chat prompt for `query` after the conversation's earlier turns
    /// (`history`, oldest first), grounded on `passages`. The client's own
    /// system messages follow the expert's instructions in the one system
    /// message chat templates expect.
    pub fn conversation_prompt(&self, history: &[ChatMessage], query: &str, passages: &[Passage]) -> Vec<ChatMessage> {
        let mut system = self.spec.system_prompt.clone();
        for m in history.iter().filter(|m| m.role == Role::System) {
            system.push_str("\n\n");
            system.push_str(&m.content);
        }
        if !passages.is_empty() {
            system.push_str(
                "\n\nAnswer from these sources and cite them by number, like [1]. \
                 If they do not contain the answer, say so.\n",
            );
            for (i, p) in passages.iter().enumerate() {
                system.push_str(&format!("\n[{}] {}\n{}\n", i + 1, p.title, p.text));
            }
        }
        let mut messages = vec![ChatMessage::system(system)];
        messages.extend(history.iter().filter(|m| m.role != Role::System).cloned());
        messages.push(ChatMessage::user(query));
        messages
    }

    /// Generation settings, with per-request overrides applied.
    pub fn params(&self, overrides: &Overrides) -> GenerateParams {
        let max_tokens = overrides
            .max_tokens
            .map_or(self.spec.max_tokens, |m| m.clamp(1, self.spec.max_tokens));
        let temperature = overrides.temperature.unwrap_or(self.spec.temperature);
        GenerateParams {
            max_tokens: max_tokens as usize,
            temperature: (temperature > 0.0).then_some(f64::from(temperature)),
            top_p: overrides.top_p.or(self.spec.top_p).map(f64::from),
            stop: overrides.stop.clone(),
            seed: overrides.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineSettings;

    fn hr() -> ExpertAgent {
        let spec = EngineSettings::default().experts[0].clone();
        let slot = Arc::new(Slot::new("expert/hr", Arc::new(crate::testing::stub_model("v1"))));
        ExpertAgent::new(spec, slot)
    }

    #[test]
    fn request_cannot_raise_the_token_cap() {
        let e = hr();
        assert_eq!(
            e.params(&Overrides {
                max_tokens: Some(10_000),
                ..Overrides::default()
            })
            .max_tokens,
            256
        );
        assert_eq!(
            e.params(&Overrides {
                max_tokens: Some(8),
                ..Overrides::default()
            })
            .max_tokens,
            8
        );
        assert_eq!(e.params(&Overrides::default()).temperature, None);
        assert_eq!(
            e.params(&Overrides {
                temperature: Some(0.7),
                ..Overrides::default()
            })
            .temperature,
            Some(0.7f32 as f64)
        );
    }

    #[test]
    fn passages_are_numbered_in_the_system_prompt() {
        let e = hr();
        let p = Passage {
            doc_id: "d1".into(),
            title: "Leave policy".into(),
            chunk_id: "d1#0".into(),
            text: "25 days".into(),
            score: 1.0,
        };
        let prompt = e.prompt("how much leave?", &[p]);
        assert!(prompt[0].content.contains("[1] Leave policy\n25 days"));
        assert!(!e.prompt("q", &[])[0].content.contains("[1]"));
    }

    #[test]
    fn a_conversation_keeps_its_turns_and_folds_client_instructions_into_the_system_message() {
        let e = hr();
        let history = [
            ChatMessage::system("Answer in French."),
            ChatMessage::user("How many leave days?"),
            ChatMessage {
                role: Role::Assistant,
                content: "25.".into(),
            },
        ];
        let prompt = e.conversation_prompt(&history, "And sick days?", &[]);
        let roles: Vec<Role> = prompt.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User]);
        assert!(
            prompt[0].content.ends_with("\n\nAnswer in French."),
            "{}",
            prompt[0].content
        );
        assert_eq!(prompt[3].content, "And sick days?");
        assert_eq!(e.conversation_prompt(&[], "q", &[]), e.prompt("q", &[]));
    }

    #[test]
    fn sampling_overrides_reach_the_engine_and_bad_ones_are_refused() {
        let e = hr();
        let o = Overrides {
            top_p: Some(0.5),
            stop: vec!["\n\n".into()],
            seed: Some(7),
            ..Overrides::default()
        };
        o.check().unwrap();
        let p = e.params(&o);
        assert_eq!(
            (p.top_p, p.stop, p.seed),
            (Some(0.5), vec!["\n\n".to_string()], Some(7))
        );
        let refused = |o: Overrides| o.check().unwrap_err().0;
        assert_eq!(
            refused(Overrides {
                top_p: Some(0.0),
                ..Overrides::default()
            }),
            "top_p"
        );
        assert_eq!(
            refused(Overrides {
                top_p: Some(1.5),
                ..Overrides::default()
            }),
            "top_p"
        );
        let five = vec!["a".to_string(); MAX_STOP_SEQUENCES + 1];
        assert_eq!(
            refused(Overrides {
                stop: five,
                ..Overrides::default()
            }),
            "stop"
        );
        assert_eq!(
            refused(Overrides {
                stop: vec![String::new()],
                ..Overrides::default()
            }),
            "stop"
        );
    }
}
