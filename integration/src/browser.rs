//! A real browser for the console's tests: Debian's headless Chromium,
//! driven over WebDriver by chromedriver on loopback (docs/console.md,
//! "How it is tested"). Calls block; each waits for what a person would
//! wait for (an element, a text) up to a deadline and says what it waited
//! for when it gives up. Screenshots go to the test's artefact folder.

use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The console's size in the tests: what the issue asks it to be usable at.
pub const WINDOW: (u32, u32) = (1280, 800);

/// One headless Chromium with its own fresh profile.
#[derive(Debug)]
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: ChildGuard,
    profile: tempfile::TempDir,
    artefacts: PathBuf,
    shots: std::cell::Cell<usize>,
}

/// Whether Debian's chromium and chromedriver are installed.
pub fn available() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

impl Browser {
    /// Starts chromedriver and a browser session; screenshots are written
    /// to `artefacts`.
    pub fn start(artefacts: &Path) -> Result<Browser> {
        if !available() {
            bail!("{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver (integration/install-deps does)");
        }
        std::fs::create_dir_all(artefacts)?;
        let port = crate::site_lab::free_port();
        let log = std::fs::File::create(artefacts.join("chromedriver.log"))?;
        let driver = ChildGuard::spawn(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log)),
            "chromedriver",
        )?;
        let profile = tempfile::tempdir()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut browser = Browser {
            runtime,
            client: None,
            driver,
            profile,
            artefacts: artefacts.to_path_buf(),
            shots: Default::default(),
        };
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            // The site manager's certificate is signed by its own site CA.
            "--ignore-certificate-errors".into(),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), serde_json::json!({"binary": CHROMIUM, "args": args}));
        caps.insert("acceptInsecureCerts".into(), serde_json::json!(true));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match browser.runtime.block_on(ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url)) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => bail!("no browser session from chromedriver at {url}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        browser.runtime.block_on(client.set_window_size(WINDOW.0, WINDOW.1))?;
        browser.client = Some(client);
        Ok(browser)
    }

    fn client(&self) -> Result<&Client> {
        self.client.as_ref().context("the browser session is closed")
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        let c = self.client()?;
        self.runtime.block_on(c.goto(url)).with_context(|| format!("opening {url}"))
    }

    /// Waits until `css` matches a displayed element and returns it.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element> {
        let c = self.client()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(found) = self.runtime.block_on(c.find_all(Locator::Css(css))) {
                for e in found {
                    if self.runtime.block_on(e.is_displayed()).unwrap_or(false) {
                        return Ok(e);
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = self.screenshot(&format!("timeout-{}", css.replace(|c: char| !c.is_alphanumeric(), "_")));
                bail!("{css} did not appear within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Waits until `css` matches a displayed element whose text contains
    /// `text`.
    pub fn wait_for_text(&self, css: &str, text: &str, timeout: Duration) -> Result<Element> {
        let c = self.client()?;
        let deadline = Instant::now() + timeout;
        let mut seen = String::new();
        loop {
            if let Ok(found) = self.runtime.block_on(c.find_all(Locator::Css(css))) {
                for e in found {
                    let t = self.runtime.block_on(e.text()).unwrap_or_default();
                    if t.contains(text) {
                        return Ok(e);
                    }
                    seen = t;
                }
            }
            if Instant::now() > deadline {
                let _ = self.screenshot(&format!("timeout-{}", text.replace(|c: char| !c.is_alphanumeric(), "_")));
                bail!("no {css} said {text:?} within {timeout:?} (last seen: {seen:?})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every element `css` matches now.
    pub fn all(&self, css: &str) -> Result<Vec<Element>> {
        let c = self.client()?;
        Ok(self.runtime.block_on(c.find_all(Locator::Css(css)))?)
    }

    /// Clicks what `css` matches, found again if the page redrew it
    /// between finding and clicking (the console refreshes every 2 s).
    pub fn click(&self, css: &str) -> Result<()> {
        let mut tries = 0;
        loop {
            let e = self.wait_for(css, Duration::from_secs(15))?;
            match self.runtime.block_on(e.click()) {
                Ok(()) => return Ok(()),
                Err(e) if tries < 5 && e.to_string().contains("stale") => tries += 1,
                Err(e) => return Err(e).with_context(|| format!("clicking {css}")),
            }
        }
    }

    pub fn click_element(&self, e: &Element) -> Result<()> {
        Ok(self.runtime.block_on(e.click())?)
    }

    /// Clears the field and types `text` into it, as a person would.
    pub fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.wait_for(css, Duration::from_secs(15))?;
        self.runtime.block_on(e.clear())?;
        self.runtime.block_on(e.send_keys(text)).with_context(|| format!("typing into {css}"))
    }

    pub fn select(&self, css: &str, value: &str) -> Result<()> {
        let e = self.wait_for(css, Duration::from_secs(15))?;
        self.runtime.block_on(e.select_by_value(value)).with_context(|| format!("choosing {value} in {css}"))
    }

    pub fn text(&self, e: &Element) -> Result<String> {
        Ok(self.runtime.block_on(e.text())?)
    }

    pub fn attr(&self, e: &Element, name: &str) -> Result<Option<String>> {
        Ok(self.runtime.block_on(e.attr(name))?)
    }

    /// Runs a script in the page and returns its value.
    pub fn script(&self, js: &str) -> Result<serde_json::Value> {
        let c = self.client()?;
        Ok(self.runtime.block_on(c.execute(js, Vec::new()))?)
    }

    /// Saves a PNG of the window as `NN-name.png` in the artefact folder.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let c = self.client()?;
        let png = self.runtime.block_on(c.screenshot())?;
        self.shots.set(self.shots.get() + 1);
        let path = self.artefacts.join(format!("{:02}-{name}.png", self.shots.get()));
        std::fs::write(&path, png)?;
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium; chromedriver goes next, and
        // any Chromium process of this profile that outlived both after it.
        if let Some(c) = self.client.take() {
            let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        self.driver.kill();
        let _ = Command::new("pkill").arg("-KILL").arg("-f").arg(self.profile.path()).status();
    }
}
