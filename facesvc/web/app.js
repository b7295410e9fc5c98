/* The Scan Wajah page: launch ticket -> camera -> challenge steps -> frames -> result.
 *
 * Talks only to this service's JSON gateway (/api/v1/...), sending the launch ticket from
 * the URL fragment (#ticket=...) as a Bearer credential. Frames are downscaled and
 * JPEG-compressed here, so a scan uploads tens of kilobytes even on a slow phone link.
 * Vanilla JS with no build step, no third-party code and no inline script (strict CSP).
 */
"use strict";

(function () {
  const STRINGS = FACESVC_STRINGS; // from i18n.js
  const JPEG_QUALITY = 0.85;
  const REQUEST_TIMEOUT_MS = 15000;
  const VERIFY_TIMEOUT_MS = 45000;
  // Timing of the poses. Looking straight: the frames come after FRONTAL_LEAD_MS, FRAME_GAP_MS
  // apart. A step: a person takes about a second to read it and start moving, turns at their
  // own pace and rarely holds still, so STEP_FRAMES frames are taken across the step's time,
  // from STEP_LEAD_MS after the instruction, STEP_GAP_MS apart; the service answers each step
  // with the first frame that shows it. The bar under the instruction shows the time left.
  const FRONTAL_LEAD_MS = 1200;
  const FRAME_GAP_MS = 250;
  const STEP_LEAD_MS = 1000;
  const STEP_FRAMES = 3;
  const STEP_GAP_MS = 600;
  // Which way to move, as the participant sees themselves in the mirrored preview.
  const STEP_ARROWS = {
    TURN_LEFT: "\u2190 ",
    TURN_RIGHT: "\u2192 ",
    LOOK_UP: "\u2191 ",
    LOOK_DOWN: "\u2193 ",
    COME_CLOSER: "\u2922 ",
  };
  const FEEDBACK_EVERY_MS = 500;
  const PRECHECK_EVERY_MS = 2500; // the server looks for the face at most this often
  const DARK_LUMA = 60;
  const BRIGHT_LUMA = 215;

  const $ = (id) => document.getElementById(id);
  const state = {
    lang: "id",
    ticket: "",
    session: null,
    screen: "loading",
    problem: null, // {kind, message?, retry: fn|null}
    result: null, // the verify response shown on the result screen
    stream: null,
    feedbackKey: "",
    feedbackTimer: 0,
    detector: null,
    pendingScan: null, // {challengeId, idempotencyKey, blobs}: resent as-is on retry
    precheckBusy: false,
    precheckAt: 0,
    scanning: false,
  };

  // ------------------------------------------------------------------ text

  function t(key, vars) {
    const table = STRINGS[state.lang] || STRINGS.id;
    let text = table[key] !== undefined ? table[key] : STRINGS.id[key];
    if (text === undefined) return key;
    for (const [name, value] of Object.entries(vars || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }

  function applyStaticText() {
    document.documentElement.lang = state.lang;
    document.title = t("title");
    for (const el of document.querySelectorAll("[data-i18n]")) {
      el.textContent = t(el.dataset.i18n);
    }
    for (const el of document.querySelectorAll("[data-i18n-aria-label]")) {
      el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
    }
    for (const btn of document.querySelectorAll(".lang-btn")) {
      btn.setAttribute("aria-pressed", String(btn.dataset.lang === state.lang));
    }
  }

  function setLanguage(lang) {
    state.lang = STRINGS[lang] ? lang : "id";
    try {
      window.localStorage.setItem("facesvc.lang", state.lang);
    } catch (_) {
      /* storage may be disabled; the choice then lasts for this page only */
    }
    applyStaticText();
    renderDynamic();
  }

  function formatReset(iso) {
    if (!iso) return "";
    const when = new Date(iso);
    const text = new Intl.DateTimeFormat(state.lang === "en" ? "en-GB" : "id-ID", {
      timeZone: "Asia/Jakarta",
      day: "numeric",
      month: "long",
      year: "numeric",
      hour: "2-digit",
      minute: "2-digit",
    }).format(when);
    return text + " WIB";
  }

  function attemptsText(attempts) {
    return t("attempts.value", { remaining: attempts.remaining, limit: attempts.limit });
  }

  // ------------------------------------------------------------------ screens

  function show(screen) {
    state.screen = screen;
    document.body.dataset.screen = screen;
    for (const section of document.querySelectorAll(".screen")) {
      section.hidden = section.id !== "screen-" + screen;
    }
    renderDynamic();
    const heading = document.querySelector("#screen-" + screen + " h2");
    if (heading) heading.focus();
  }

  function renderDynamic() {
    const s = state.session;
    if (s) {
      $("fact-training").textContent = s.training_id;
      $("fact-gate").textContent = t("gate." + s.gate) + (s.session_id ? " · " + s.session_id : "");
      $("fact-attempts").textContent = attemptsText(s.attempts);
      const back = s.return_url || "#";
      $("link-back").href = back;
      $("link-back").hidden = !s.return_url;
    } else {
      $("link-back").hidden = true;
    }
    if (state.screen === "problem" && state.problem) renderProblem();
    if (state.screen === "result" && state.result) renderResult();
    if (state.screen === "camera" && state.feedbackKey) {
      $("feedback").textContent = t(state.feedbackKey);
    }
  }

  function renderProblem() {
    const p = state.problem;
    $("h-problem").textContent = t("problem." + p.kind + ".title");
    // Localised text where the page knows the case; the server's own words otherwise.
    const known = p.messageKey && t(p.messageKey) !== p.messageKey ? t(p.messageKey) : "";
    $("problem-message").textContent = known || p.message || t("problem." + p.kind + ".body");
    $("problem-help").textContent = t("problem." + p.kind + ".help");
    $("problem-free").hidden = !p.free;
    $("btn-problem-retry").hidden = !p.retry;
  }

  function renderResult() {
    const r = state.result;
    $("result-message").textContent = t("decision." + r.decision);
    $("result-detail").textContent = r.reason ? t("result.server_reason", { reason: r.reason }) : "";
    $("result-attempts").textContent = attemptsText(r.attempts);
    $("result-reset").textContent = formatReset(r.attempts.resets_at);
    $("result-reference").textContent = r.verification_id
      ? t("result.reference", { id: r.verification_id })
      : "";
    const final = ["ATTEMPTS_EXHAUSTED", "NOT_ENROLLED", "OUTSIDE_WINDOW"].includes(r.decision);
    $("btn-result-retry").hidden = final || r.attempts.remaining <= 0;
  }

  function showProblem(kind, options) {
    const o = options || {};
    state.problem = {
      kind: kind,
      message: o.message || "",
      messageKey: o.messageKey || "",
      retry: o.retry || null,
      free: o.free !== false,
    };
    stopCamera();
    show("problem");
  }

  function showResult(response) {
    state.result = response;
    if (state.session) state.session.attempts = response.attempts;
    stopCamera();
    show("result");
  }

  // ------------------------------------------------------------------ network

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || "HTTP " + status);
      this.status = status;
      this.code = (body && body.error && body.error.code) || "";
    }
  }

  async function api(method, path, body, timeoutMs) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), timeoutMs || REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(path, {
        method: method,
        headers: { Authorization: "Bearer " + state.ticket, Accept: "application/json" },
        body: body,
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      let payload = null;
      try {
        payload = await response.json();
      } catch (_) {
        payload = null;
      }
      if (!response.ok) throw new HttpError(response.status, payload);
      return payload;
    } finally {
      clearTimeout(timer);
    }
  }

  /* Maps a failed request to its screen. ``retry`` re-runs what failed; ``free`` is false
   * when the frames may have reached the server (the help text then explains that a retry
   * resends the same scan, which costs no second attempt). */
  function handleFailure(error, retry, free) {
    const nothingSent = free !== false;
    if (error instanceof HttpError) {
      if (error.code.startsWith("TICKET_") || error.status === 401) {
        showProblem("link", { messageKey: "ticket." + error.code, retry: null });
      } else if (error.status >= 500 || error.status === 429) {
        showProblem("server", { message: error.message, retry: retry, free: nothingSent });
      } else {
        // A refusal that is not a decision (bad image, policy): say it and start over.
        showProblem("server", { message: error.message, retry: restartScan });
      }
    } else if (error && error.name === "AbortError") {
      showProblem("timeout", { retry: retry, free: nothingSent });
    } else {
      showProblem("network", { retry: retry, free: nothingSent });
    }
  }

  // ------------------------------------------------------------------ session

  async function loadSession() {
    show("loading");
    const match = /(?:^|[#&])ticket=([^&]+)/.exec(window.location.hash);
    state.ticket = match ? decodeURIComponent(match[1]) : "";
    if (!state.ticket) {
      showProblem("link", { retry: null });
      return;
    }
    try {
      state.session = await api("GET", "/api/v1/session");
    } catch (error) {
      handleFailure(error, loadSession);
      return;
    }
    if (state.session.attempts.remaining <= 0) {
      showResult({
        decision: "ATTEMPTS_EXHAUSTED",
        reason: "",
        verification_id: "",
        attempts: state.session.attempts,
      });
      return;
    }
    show("intro");
  }

  // ------------------------------------------------------------------ camera

  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showProblem("camera_unsupported", { retry: null });
      return;
    }
    show("camera");
    setFeedback("camera.starting");
    $("feedback").hidden = false;
    $("step-banner").hidden = true;
    $("step-hint").hidden = true;
    $("step-timer").hidden = true;
    $("step-list").hidden = true;
    $("btn-start-scan").hidden = false;
    $("btn-start-scan").disabled = true;
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({
        video: { facingMode: "user", width: { ideal: 1280 }, height: { ideal: 720 } },
        audio: false,
      });
    } catch (error) {
      const denied = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
      showProblem(denied ? "camera_denied" : "camera_absent", { retry: openCamera });
      return;
    }
    const video = $("video");
    video.srcObject = state.stream;
    try {
      await video.play();
    } catch (_) {
      /* autoplay of a muted stream is allowed; a refusal shows as no frames below */
    }
    if ("FaceDetector" in window) {
      try {
        state.detector = new window.FaceDetector({ fastMode: true, maxDetectedFaces: 3 });
      } catch (_) {
        state.detector = null;
      }
    }
    $("btn-start-scan").disabled = false;
    state.feedbackTimer = window.setInterval(updateFeedback, FEEDBACK_EVERY_MS);
    updateFeedback();
  }

  function stopCamera() {
    window.clearInterval(state.feedbackTimer);
    state.feedbackTimer = 0;
    if (state.stream) {
      for (const track of state.stream.getTracks()) track.stop();
      state.stream = null;
    }
    $("video").srcObject = null;
  }

  function setFeedback(key) {
    if (key === state.feedbackKey) return; // a live region must not repeat itself
    state.feedbackKey = key;
    $("feedback").textContent = t(key);
    $("guide-oval").classList.toggle("ok", key === "feedback.ok");
  }

  /* Live checks: brightness of the oval's centre from a 64x48 copy of the frame (every
   * half second, free), then face count, size, sharpness and pose: from the browser's own
   * face detector where there is one, else from the server's pre-check of one frame every
   * few seconds (no attempt is spent). The scan itself is checked again in full. */
  async function updateFeedback() {
    const video = $("video");
    if (state.scanning || !video.videoWidth) return;
    const small = document.createElement("canvas");
    small.width = 64;
    small.height = 48;
    const ctx = small.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(video, 0, 0, 64, 48);
    const data = ctx.getImageData(20, 8, 24, 32).data;
    let sum = 0;
    for (let i = 0; i < data.length; i += 4) {
      sum += 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
    }
    const luma = sum / (data.length / 4);
    if (luma < DARK_LUMA) return setFeedback("feedback.dark");
    if (luma > BRIGHT_LUMA) return setFeedback("feedback.bright");
    if (state.detector) {
      try {
        const faces = await state.detector.detect(video);
        if (faces.length === 0) return setFeedback("feedback.no_face");
        if (faces.length > 1) return setFeedback("feedback.many_faces");
        if (faces[0].boundingBox.height < video.videoHeight * 0.3) {
          return setFeedback("feedback.too_far");
        }
        return setFeedback("feedback.ok");
      } catch (_) {
        state.detector = null; // unsupported on this device after all
      }
    }
    // No detector in this browser: a neutral instruction until the server's pre-check says
    // more (light problems seen here a moment ago no longer hold).
    const neutral = ["", "camera.starting", "feedback.dark", "feedback.bright"];
    if (neutral.includes(state.feedbackKey)) setFeedback("feedback.position");
    precheck(luma);
  }

  const PRECHECK_FEEDBACK = {
    NO_FACE: "feedback.no_face",
    MULTIPLE_FACES: "feedback.many_faces",
    OK: "feedback.ok",
  };
  const CHECK_FEEDBACK = {
    face_size: "feedback.too_far",
    sharpness: "feedback.blurry",
    yaw: "feedback.straight",
    pitch: "feedback.straight",
    clipping: "feedback.bright",
  };

  /* One frame to the server's pre-check, never two at once; failures are ignored (the
   * guidance is advice, the scan decides). */
  async function precheck(luma) {
    const now = Date.now();
    if (state.precheckBusy || now - state.precheckAt < PRECHECK_EVERY_MS) return;
    state.precheckBusy = true;
    state.precheckAt = now;
    try {
      const report = await api("POST", "/api/v1/precheck", await captureFrame());
      if (state.scanning || state.screen !== "camera") return;
      let key = PRECHECK_FEEDBACK[report.status] || "feedback.position";
      if (report.status === "LOW_QUALITY") {
        const check = report.failed_checks[0];
        if (check === "brightness") key = luma < 128 ? "feedback.dark" : "feedback.bright";
        else key = CHECK_FEEDBACK[check] || "feedback.position";
      }
      setFeedback(key);
    } catch (_) {
      /* offline or busy: keep the last advice; the scan reports its own problems */
    } finally {
      state.precheckBusy = false;
    }
  }

  // ------------------------------------------------------------------ scan

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function captureFrame() {
    const video = $("video");
    const canvas = $("canvas");
    const width = Math.min(state.session.capture.frame_width_px, video.videoWidth);
    const height = Math.round((video.videoHeight * width) / video.videoWidth);
    canvas.width = width;
    canvas.height = height;
    // The preview is mirrored for the participant; frames are sent as the camera sees them.
    canvas.getContext("2d").drawImage(video, 0, 0, width, height);
    return new Promise((resolve, reject) => {
      canvas.toBlob(
        (blob) => (blob ? resolve(blob) : reject(new Error("frame capture failed"))),
        "image/jpeg",
        JPEG_QUALITY,
      );
    });
  }

  function newKey() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function announceStep(index, total, pose, durationMs) {
    const banner = $("step-banner");
    banner.hidden = false;
    banner.textContent =
      (STEP_ARROWS[pose] || "") +
      t("step.progress", { n: index + 1, total: total, text: t("step." + pose) });
    const hint = $("step-hint");
    hint.textContent = t("step.hint." + pose);
    hint.hidden = false;
    // The bar empties over the pose's time: restart its animation for each pose.
    const timer = $("step-timer");
    timer.hidden = false;
    const bar = timer.firstElementChild;
    bar.style.animation = "none";
    void bar.offsetWidth; // a reflow, so that the animation starts again from full
    bar.style.animation = "step-time " + durationMs + "ms linear forwards";
    const items = $("step-list").children;
    for (let i = 0; i < items.length; i++) {
      items[i].classList.toggle("current", i === index);
      items[i].classList.toggle("done", i < index);
      if (i === index) items[i].setAttribute("aria-current", "step");
      else items[i].removeAttribute("aria-current");
    }
  }

  async function startScan() {
    if (state.scanning) return;
    state.scanning = true;
    $("btn-start-scan").disabled = true;
    $("btn-start-scan").hidden = true; // the steps now lead; nothing to press until the result
    $("feedback").hidden = true; // a pre-check hint ("look straight") would contradict a step
    const s = state.session;
    let challenge = { challenge_id: "", steps: [], min_frames: s.capture.min_frames, expires_at: null };
    try {
      if (s.liveness === "challenge") challenge = await api("POST", "/api/v1/challenge");
    } catch (error) {
      state.scanning = false;
      handleFailure(error, restartScan);
      return;
    }
    const poses = ["LOOK_STRAIGHT"].concat(challenge.steps);
    const list = $("step-list");
    list.textContent = "";
    for (const pose of poses) {
      const item = document.createElement("li");
      item.textContent = t("step." + pose);
      list.appendChild(item);
    }
    list.hidden = poses.length < 2;
    const perPose = Math.max(
      s.capture.frames_per_pose,
      Math.ceil((challenge.min_frames || 1) / poses.length),
    );
    const blobs = [];
    try {
      for (let i = 0; i < poses.length; i++) {
        const step = i > 0;
        const count = step ? Math.max(STEP_FRAMES, perPose) : perPose;
        const lead = step ? STEP_LEAD_MS : FRONTAL_LEAD_MS;
        const gap = step ? STEP_GAP_MS : FRAME_GAP_MS;
        announceStep(i, poses.length, poses[i], lead + gap * count);
        await sleep(lead);
        for (let k = 0; k < count && blobs.length < s.capture.max_frames; k++) {
          blobs.push(await captureFrame());
          await sleep(gap);
        }
      }
    } catch (error) {
      state.scanning = false;
      showProblem("camera_absent", { retry: restartScan });
      return;
    }
    state.scanning = false;
    $("step-banner").hidden = true;
    $("step-hint").hidden = true;
    $("step-timer").hidden = true;
    if (challenge.expires_at && Date.now() >= Date.parse(challenge.expires_at)) {
      showProblem("challenge_expired", { retry: restartScan });
      return;
    }
    state.pendingScan = {
      challengeId: challenge.challenge_id,
      idempotencyKey: newKey(),
      blobs: blobs,
    };
    stopCamera();
    await submitScan();
  }

  /* Sends the pending scan. A retry after a network failure or timeout sends the same frames
   * with the same idempotency key, so a scan the server did receive is answered again
   * instead of costing a second attempt. */
  async function submitScan() {
    const scan = state.pendingScan;
    show("uploading");
    const form = new FormData();
    form.append("challenge_id", scan.challengeId);
    form.append("idempotency_key", scan.idempotencyKey);
    scan.blobs.forEach((blob, i) => form.append("frame", blob, "frame-" + i + ".jpg"));
    let response;
    try {
      const timeout = state.session.capture.verify_timeout_ms || VERIFY_TIMEOUT_MS;
      response = await api("POST", "/api/v1/verify", form, timeout);
    } catch (error) {
      handleFailure(error, submitScan, false);
      return;
    }
    state.pendingScan = null;
    if (response.decision === "VERIFIED" && response.redirect_url) {
      $("link-continue").href = response.redirect_url;
      show("success");
      // A short pause lets screen readers announce success before the page changes.
      setTimeout(() => window.location.assign(response.redirect_url), 1200);
      return;
    }
    showResult(response);
  }

  function restartScan() {
    state.pendingScan = null;
    state.result = null;
    openCamera();
  }

  // ------------------------------------------------------------------ start

  function init() {
    let saved = "";
    try {
      saved = window.localStorage.getItem("facesvc.lang") || "";
    } catch (_) {
      saved = "";
    }
    const asked = new URLSearchParams(window.location.search).get("lang");
    state.lang = STRINGS[asked] ? asked : STRINGS[saved] ? saved : "id";
    applyStaticText();
    for (const btn of document.querySelectorAll(".lang-btn")) {
      btn.addEventListener("click", () => setLanguage(btn.dataset.lang));
    }
    $("btn-open-camera").addEventListener("click", openCamera);
    $("btn-start-scan").addEventListener("click", startScan);
    $("btn-result-retry").addEventListener("click", restartScan);
    $("btn-problem-retry").addEventListener("click", () => {
      const retry = state.problem && state.problem.retry;
      if (retry) retry();
    });
    window.addEventListener("pagehide", stopCamera);
    loadSession();
  }

  init();
})();
