//! `docs/concepts.md` cannot drift: every step it marks runnable is run here against the real
//! `scripts/demo`, and its output must match what the doc says the reader will see.
//!
//! The doc's format:
//! - a fenced block with the info string `sh try` is a step for `scripts/demo`; `sh try instances`
//!   one for `scripts/demo --instances 3`. The blocks of one demo run in one `bash`, in the doc's
//!   order (so a later step may use a variable an earlier one set), with `COOKIE` and `COOKIE2`
//!   set to two sessions of alice (`COOKIE` only for the instances; the doc tells the reader to
//!   copy them from the browser; the test logs in through the provider's forms, as the browser
//!   does);
//! - the ```` ```text ```` block right after it is the expected output (stdout and stderr,
//!   `\r` dropped, trailing blanks ignored); `…` stands for any text within a line;
//! - every ```` ```toml ```` block names the file it is taken from (`toml from=config.toml`); its
//!   lines must appear in that file in the same order. `config.toml` is the shipped configuration
//!   the demo runs (and `scripts/test` checks); the files under `data/instances/` are the ones
//!   `scripts/demo --instances 3` generated and ran in this test.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::path::Path;
use std::time::Duration;

use demo::Demo;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/concepts.md");
/// Upper bound for all the steps of one demo (the refresh step waits for a token to age).
const STEPS_WITHIN: Duration = Duration::from_secs(120);

/// A fenced block of the doc.
#[derive(Debug)]
struct Block {
    info: String,
    text: String,
    /// 1-based line of the opening fence.
    line: usize,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_owned(),
                    text: String::new(),
                    line: i + 1,
                });
            }
            (Some(_), Some("")) => out.push(open.take().unwrap()),
            (Some(b), _) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(
        open.is_none(),
        "docs/concepts.md: a code block is not closed"
    );
    out
}

/// A runnable step and the output the doc promises.
struct Step<'a> {
    code: &'a Block,
    expected: &'a Block,
}

/// The steps for `mode` (`""` for `scripts/demo`, `"instances"`), in the doc's order.
fn steps<'a>(all: &'a [Block], mode: &str) -> Vec<Step<'a>> {
    let mut steps = Vec::new();
    for (i, b) in all.iter().enumerate() {
        let Some(rest) = b.info.strip_prefix("sh try") else {
            continue;
        };
        if rest.trim() != mode {
            continue;
        }
        let expected = all
            .get(i + 1)
            .filter(|e| e.info == "text")
            .unwrap_or_else(|| {
                panic!(
                    "docs/concepts.md:{}: a `sh try` block must be followed by a `text` block \
                     with its output",
                    b.line
                )
            });
        steps.push(Step { code: b, expected });
    }
    steps
}

/// Does `actual` match `expected`, line by line, `…` standing for any text within a line?
fn matches(expected: &str, actual: &str) -> bool {
    let clean = |s: &str| -> Vec<String> {
        s.replace('\r', "")
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let (want, got) = (clean(expected), clean(actual));
    want.len() == got.len() && want.iter().zip(&got).all(|(w, g)| line_matches(w, g))
}

fn line_matches(pattern: &str, line: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Runs the steps in one `bash` (cwd: the repository) and checks each one's output.
async fn run_steps(steps: &[Step<'_>], cookies: &[(&str, String)]) {
    assert!(!steps.is_empty(), "docs/concepts.md has no runnable steps");
    let marker = "@@coatcheck-concepts-step@@";
    let mut script = String::from("exec 2>&1\n");
    for s in steps {
        script.push_str(&format!("echo '{marker}'\n{}\n", s.code.text));
    }
    let run = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(demo::ROOT)
        .envs(cookies.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(STEPS_WITHIN, run)
        .await
        .unwrap_or_else(|_| panic!("the doc's steps took longer than {STEPS_WITHIN:?}"))
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let outputs: Vec<&str> = stdout.split(&format!("{marker}\n")).skip(1).collect();
    assert_eq!(outputs.len(), steps.len(), "every step ran:\n{stdout}");
    for (s, got) in steps.iter().zip(outputs) {
        assert!(
            matches(&s.expected.text, got),
            "docs/concepts.md:{}: the step's output does not match the doc.\n--- step\n{}--- the doc \
             says (line {})\n{}--- the demo answered\n{got}",
            s.code.line,
            s.code.text,
            s.expected.line,
            s.expected.text,
        );
        eprintln!("docs/concepts.md:{} ok\n{got}", s.code.line);
    }
}

/// Every `toml` block names its file, and its lines appear there in order.
fn check_toml_blocks(all: &[Block], only: impl Fn(&str) -> bool) -> usize {
    let mut checked = 0;
    for b in all.iter().filter(|b| b.info.starts_with("toml")) {
        let file = b
            .info
            .strip_prefix("toml from=")
            .unwrap_or_else(|| {
                panic!(
                    "docs/concepts.md:{}: a toml block must say which tested file it comes from \
                     (```toml from=config.toml)",
                    b.line
                )
            })
            .trim();
        if !only(file) {
            continue;
        }
        let text = std::fs::read_to_string(Path::new(demo::ROOT).join(file))
            .unwrap_or_else(|e| panic!("docs/concepts.md:{}: {file}: {e}", b.line));
        let mut lines = text.lines();
        for want in b.text.lines() {
            assert!(
                lines.any(|l| l == want),
                "docs/concepts.md:{}: {want:?} is not in {file} (in this order)",
                b.line
            );
        }
        checked += 1;
    }
    checked
}

#[tokio::test]
async fn every_step_of_the_concepts_doc_does_what_the_doc_says_against_the_demo() {
    let doc = std::fs::read_to_string(DOC).expect("docs/concepts.md");
    let all = blocks(&doc);
    assert!(
        check_toml_blocks(&all, |f| f == "config.toml") > 0,
        "docs/concepts.md quotes config.toml"
    );
    let steps = steps(&all, "");
    let _demo = Demo::start(&[]).await;
    let cookies = [
        ("COOKIE", demo::login_cookie("alice").await),
        ("COOKIE2", demo::login_cookie("alice").await),
    ];
    run_steps(&steps, &cookies).await;
}

#[tokio::test]
async fn every_several_instances_step_of_the_concepts_doc_does_what_the_doc_says() {
    let doc = std::fs::read_to_string(DOC).expect("docs/concepts.md");
    let all = blocks(&doc);
    let steps = steps(&all, "instances");
    let _demo = Demo::start(&["--instances", "3"]).await;
    assert!(
        check_toml_blocks(&all, |f| f.starts_with("data/instances/")) > 0,
        "docs/concepts.md quotes a generated instance configuration"
    );
    let cookies = [("COOKIE", demo::login_cookie("alice").await)];
    run_steps(&steps, &cookies).await;
}

#[test]
fn the_output_matcher_takes_ellipses_for_any_text_and_nothing_else() {
    assert!(matches("a…c\nok", "abbbc\r\nok\n\n"));
    assert!(matches("{\"id\":\"…\"}", "{\"id\":\"42\"}"));
    assert!(!matches("{\"id\":\"…\"}", "{\"id\":42}"));
    assert!(!matches("a…c", "abd"));
    assert!(!matches("one", "one\ntwo"));
    assert!(!matches("200", "401"));
    assert!(line_matches("…", ""));
    assert!(!line_matches("ab…ba", "aba"));
}
