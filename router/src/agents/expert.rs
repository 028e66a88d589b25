//! Expert agents: answer a routed query with streaming generation.
//!
//! An expert is configuration (name, description, system prompt, generation
//! settings) plus a model slot. Retrieved passages, when a retriever supplies
//! them, go into the system prompt with citation ids `[1]`, `[2]`, ...

use std::sync::Arc;

use crate::config::ExpertSpec;
use crate::engine::{ChatMessage, GenerateParams};
use crate::registry::{ServedModel, Slot};
use crate::retrieval::Passage;

/// One expert agent.
pub struct ExpertAgent {
    spec: ExpertSpec,
    slot: Arc<Slot>,
}

/// Per-request overrides of an expert's generation settings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overrides {
    /// Cap on new tokens (never above the expert's own cap).
    pub max_tokens: Option<u32>,
    /// Temperature.
    pub temperature: Option<f32>,
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
        let mut system = self.spec.system_prompt.clone();
        if !passages.is_empty() {
            system.push_str(
                "\n\nAnswer from these sources and cite them by number, like [1]. \
                 If they do not contain the answer, say so.\n",
            );
            for (i, p) in passages.iter().enumerate() {
                system.push_str(&format!("\n[{}] {}\n{}\n", i + 1, p.title, p.text));
            }
        }
        vec![ChatMessage::system(system), ChatMessage::user(query)]
    }

    /// Generation settings, with per-request overrides applied.
    pub fn params(&self, overrides: Overrides) -> GenerateParams {
        let max_tokens = overrides
            .max_tokens
            .map_or(self.spec.max_tokens, |m| m.clamp(1, self.spec.max_tokens));
        let temperature = overrides.temperature.unwrap_or(self.spec.temperature);
        GenerateParams {
            max_tokens: max_tokens as usize,
            temperature: (temperature > 0.0).then_some(f64::from(temperature)),
            top_p: self.spec.top_p.map(f64::from),
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
            e.params(Overrides {
                max_tokens: Some(10_000),
                temperature: None
            })
            .max_tokens,
            256
        );
        assert_eq!(
            e.params(Overrides {
                max_tokens: Some(8),
                temperature: None
            })
            .max_tokens,
            8
        );
        assert_eq!(e.params(Overrides::default()).temperature, None);
        assert_eq!(
            e.params(Overrides {
                max_tokens: None,
                temperature: Some(0.7)
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
}
