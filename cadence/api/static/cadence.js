/*! cadence.js: send Segment-spec page, track, identify and alias calls to cadence.
 *
 * Include it with data attributes (host defaults to the script's own origin):
 *   <script src="https://cadence.example.com/sdk/cadence.js" data-write-key="KEY"></script>
 * or with the snippet API (calls made before the script loads are queued):
 *   cadence.load({writeKey: "KEY", host: "https://cadence.example.com", consentRequired: true});
 * Reference: docs/tracker.md. No dependencies; works in every evergreen browser.
 */
(function (window, document) {
  "use strict";

  var VERSION = "0.1.0";
  var PREFIX = "cadence_";
  var UTM = { utm_campaign: "name", utm_source: "source", utm_medium: "medium", utm_term: "term", utm_content: "content" };

  var existing = window.cadence;
  if (existing && existing.VERSION) return; // loaded twice: keep the first

  var opts = null;
  var anonymousId = null;
  var userId = null;
  var granted = false; // consent to collect (always true when consent mode is off)
  var queue = []; // calls waiting to be sent (persisted when collection is allowed)
  var pending = []; // calls made before consent: memory only, never persisted
  var timer = null;
  var inflight = false;
  var attempt = 0;
  var hidden = false;

  // ---------------------------------------------------------------- storage
  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) return decodeURIComponent(parts[i].slice(eq + 1));
    }
    return null;
  }

  function writeCookie(name, value, days) {
    var cookie = name + "=" + encodeURIComponent(value) + "; path=/; SameSite=Lax; max-age=" + days * 86400;
    if (opts && opts.cookieDomain) cookie += "; domain=" + opts.cookieDomain;
    if (location.protocol === "https:") cookie += "; Secure";
    try { document.cookie = cookie; } catch (e) { /* cookies disabled */ }
  }

  function local(op, key, value) {
    try {
      var ls = window.localStorage;
      if (op === "get") return ls.getItem(key);
      if (op === "set") ls.setItem(key, value);
      else ls.removeItem(key);
    } catch (e) { /* storage disabled or full */ }
    return null;
  }

  // A first-party cookie, with localStorage as the fallback when cookies are blocked or cleared.
  function get(name) {
    return readCookie(PREFIX + name) || local("get", PREFIX + name);
  }

  function set(name, value) {
    writeCookie(PREFIX + name, value, opts.cookieDays);
    local("set", PREFIX + name, value);
  }

  function remove(name) {
    writeCookie(PREFIX + name, "", -1);
    local("remove", PREFIX + name);
  }

  // ---------------------------------------------------------------- helpers
  function uuid() {
    var c = window.crypto;
    if (c && c.randomUUID) return c.randomUUID();
    var b = new Uint8Array(16);
    if (c && c.getRandomValues) c.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    var h = "";
    for (var j = 0; j < 16; j++) h += (b[j] + 256).toString(16).slice(1) + ([3, 5, 7, 9].indexOf(j) >= 0 ? "-" : "");
    return h;
  }

  function extend(target) {
    for (var i = 1; i < arguments.length; i++) {
      var src = arguments[i];
      if (src) for (var k in src) if (Object.prototype.hasOwnProperty.call(src, k)) target[k] = src[k];
    }
    return target;
  }

  function isObject(x) {
    return x !== null && typeof x === "object" && !Array.isArray(x);
  }

  function warn(message) {
    if (window.console && console.warn) console.warn("cadence.js: " + message);
  }

  function collecting() {
    return granted && get("optout") !== "1";
  }

  function campaign() {
    var out = {};
    var found = false;
    var params = new URLSearchParams(location.search);
    for (var key in UTM) {
      var value = params.get(key);
      if (value) { out[UTM[key]] = value; found = true; }
    }
    return found ? out : null;
  }

  function pageFacts() {
    var canonical = document.querySelector("link[rel='canonical']");
    var url = canonical && canonical.href ? canonical.href : location.href.split("#")[0];
    return { path: location.pathname, referrer: document.referrer, search: location.search, title: document.title, url: url };
  }

  function context() {
    var ctx = {
      library: { name: "cadence.js", version: VERSION },
      page: pageFacts(),
      userAgent: navigator.userAgent,
      locale: navigator.language,
      screen: { width: window.screen.width, height: window.screen.height, density: window.devicePixelRatio }
    };
    try { ctx.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* old browser */ }
    var utm = campaign();
    if (utm) ctx.campaign = utm;
    return ctx;
  }

  function message(type, fields) {
    var msg = extend({
      type: type,
      messageId: uuid(),
      anonymousId: anonymousId,
      originalTimestamp: new Date().toISOString(),
      context: context()
    }, fields);
    if (userId && !msg.userId) msg.userId = userId;
    return msg;
  }

  // ---------------------------------------------------------------- queue
  function persist() {
    if (!collecting()) return;
    if (queue.length) local("set", PREFIX + "queue", JSON.stringify(queue));
    else local("remove", PREFIX + "queue");
  }

  function enqueue(msg) {
    if (!opts) { warn("call cadence.load() first"); return; }
    if (get("optout") === "1") return;
    if (!granted) {
      pending.push(msg);
      if (pending.length > opts.maxQueue) pending.shift();
      return;
    }
    queue.push(msg);
    if (queue.length > opts.maxQueue) queue.shift();
    persist();
    if (hidden) beaconAll();
    else if (queue.length >= opts.flushAt) flush();
    else schedule(opts.flushInterval);
  }

  function schedule(delay) {
    if (timer || hidden) return;
    timer = setTimeout(function () { timer = null; flush(); }, delay);
  }

  function dropIds(items) {
    var gone = {};
    for (var i = 0; i < items.length; i++) gone[items[i].messageId] = true;
    queue = queue.filter(function (m) { return !gone[m.messageId]; });
    persist();
  }

  // The first calls of the queue whose JSON stays under ``limit`` bytes (at least one).
  function chunk(limit) {
    var items = [];
    var size = 40;
    for (var i = 0; i < queue.length && items.length < opts.batchSize; i++) {
      var bytes = JSON.stringify(queue[i]).length + 1;
      if (items.length && size + bytes > limit) break;
      items.push(queue[i]);
      size += bytes;
    }
    return items;
  }

  function body(items, withKey) {
    var sentAt = new Date().toISOString();
    var batch = items.map(function (m) { return extend({}, m, { sentAt: sentAt }); });
    var out = { batch: batch, sentAt: sentAt };
    if (withKey) out.writeKey = opts.writeKey;
    return JSON.stringify(out);
  }

  function endpoint() {
    return opts.host.replace(/\/+$/, "") + "/v1/batch";
  }

  // POST a batch with fetch; ``done(retryAfterMs|null)`` is null on success or a final answer.
  function post(items, done) {
    fetch(endpoint(), {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Basic " + btoa(opts.writeKey + ":") },
      body: body(items, false),
      credentials: "omit",
      keepalive: hidden
    }).then(function (res) {
      if (res.status === 429 || res.status === 408 || res.status >= 500) {
        done(retryAfter(res.headers.get("Retry-After")));
        return;
      }
      if (!res.ok) warn("cadence answered " + res.status + "; dropping " + items.length + " call(s)");
      done(null);
    }, function () {
      done(0); // network error: retry with backoff
    });
  }

  function retryAfter(header) {
    if (!header) return 0;
    var seconds = Number(header);
    if (!isNaN(seconds)) return Math.max(0, seconds * 1000);
    var when = Date.parse(header);
    return isNaN(when) ? 0 : Math.max(0, when - Date.now());
  }

  function backoff(n) {
    var ms = Math.min(opts.retryBaseMs * Math.pow(2, n), opts.retryMaxMs);
    return ms / 2 + Math.random() * (ms / 2); // jitter: many tabs do not retry in step
  }

  function flush() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (!opts || inflight || !queue.length || !collecting()) return;
    var items = chunk(opts.maxBatchBytes);
    inflight = true;
    post(items, function (wait) {
      inflight = false;
      if (wait === null) {
        attempt = 0;
        dropIds(items);
        if (queue.length) flush();
        return;
      }
      attempt += 1;
      if (attempt > opts.maxRetries) {
        warn("giving up on " + items.length + " call(s) after " + opts.maxRetries + " retries");
        attempt = 0;
        dropIds(items);
        if (queue.length) schedule(opts.flushInterval);
        return;
      }
      schedule(Math.max(wait, backoff(attempt - 1)));
    });
  }

  // On page hide the page may never run again: hand everything to the browser with sendBeacon.
  function beaconAll() {
    if (!opts || !queue.length || !collecting()) return;
    if (!navigator.sendBeacon) { flush(); return; }
    while (queue.length) {
      var items = chunk(opts.beaconBytes);
      var blob = new Blob([body(items, true)], { type: "text/plain;charset=UTF-8" });
      var accepted = false;
      try { accepted = navigator.sendBeacon(endpoint(), blob); } catch (e) { accepted = false; }
      if (!accepted) break; // stays persisted; sent on the next page
      dropIds(items);
    }
  }

  // A call that must go out even though collection is off (the opt-out record itself).
  function sendNow(msg, tries) {
    if (hidden && navigator.sendBeacon) {
      var blob = new Blob([body([msg], true)], { type: "text/plain;charset=UTF-8" });
      if (navigator.sendBeacon(endpoint(), blob)) return;
    }
    post([msg], function (wait) {
      if (wait !== null && tries < opts.maxRetries) {
        setTimeout(function () { sendNow(msg, tries + 1); }, Math.max(wait, backoff(tries)));
      }
    });
  }

  function consentEvent(channels) {
    return message("track", {
      event: "Consent Updated",
      properties: { consent: channels, source: "cadence.js" }
    });
  }

  function grant() {
    granted = true;
    set("anonymous_id", anonymousId);
    if (userId) set("user_id", userId);
    if (opts.consentRequired) set("consent", "1");
    var waiting = pending;
    pending = [];
    for (var i = 0; i < waiting.length; i++) enqueue(waiting[i]);
  }

  // ---------------------------------------------------------------- public API
  var api = {
    VERSION: VERSION,

    /** Configure the tracker; see docs/tracker.md for every option. */
    load: function (options) {
      if (opts) { warn("cadence.load() called twice; ignored"); return; }
      options = options || {};
      if (!options.writeKey) { warn("cadence.load() needs a writeKey"); return; }
      opts = extend({
        host: "",
        consentRequired: false,
        flushAt: 20,
        flushInterval: 5000,
        batchSize: 100,
        maxBatchBytes: 450000,
        beaconBytes: 60000,
        maxQueue: 1000,
        maxRetries: 10,
        retryBaseMs: 1000,
        retryMaxMs: 60000,
        cookieDays: 365,
        cookieDomain: null
      }, options);
      if (!opts.host) opts.host = location.origin;
      anonymousId = get("anonymous_id") || uuid();
      userId = get("user_id");
      granted = !opts.consentRequired || get("consent") === "1";
      if (collecting()) {
        set("anonymous_id", anonymousId);
        try { queue = JSON.parse(local("get", PREFIX + "queue") || "[]"); } catch (e) { queue = []; }
        if (queue.length) schedule(0);
      }
    },

    /** Record a page view: ``page([name], [properties])``. */
    page: function (name, properties) {
      if (isObject(name)) { properties = name; name = undefined; }
      var fields = { properties: extend(pageFacts(), properties) };
      if (name) fields.name = name;
      enqueue(message("page", fields));
    },

    /** Record an action: ``track(event, [properties])``. */
    track: function (event, properties) {
      if (!event) { warn("track() needs an event name"); return; }
      enqueue(message("track", { event: String(event), properties: properties || {} }));
    },

    /** Say who the visitor is: ``identify([userId], [traits])``; the id is kept for later calls. */
    identify: function (id, traits) {
      if (isObject(id)) { traits = id; id = undefined; }
      if (id !== undefined && id !== null && id !== "") {
        userId = String(id);
        if (collecting()) set("user_id", userId);
      }
      enqueue(message("identify", { traits: traits || {} }));
    },

    /** Link ``previousId`` (default: the current user or anonymous id) to ``newUserId``. */
    alias: function (newUserId, previousId) {
      if (!newUserId) { warn("alias() needs a user id"); return; }
      var previous = previousId || userId || anonymousId;
      userId = String(newUserId);
      if (collecting()) set("user_id", userId);
      enqueue(message("alias", { userId: userId, previousId: String(previous) }));
    },

    /**
     * Give (true, or an object of channels) or refuse (false) consent to collect.
     * With channels, e.g. ``{email: true, sms: false}``, a ``Consent Updated`` event
     * records them; ``analytics: false`` in the object refuses collection.
     */
    consent: function (value) {
      if (!opts) { warn("call cadence.load() first"); return; }
      var allowed = value === true || (isObject(value) && value.analytics !== false);
      if (!allowed) {
        granted = !opts.consentRequired;
        pending = [];
        if (opts.consentRequired) {
          // Withdrawn: drop what waits and every identifier this script stored.
          queue = [];
          local("remove", PREFIX + "queue");
          remove("consent");
          remove("anonymous_id");
          remove("user_id");
        }
        return;
      }
      grant();
      if (isObject(value)) {
        var channels = {};
        for (var k in value) if (k !== "analytics") channels[k] = !!value[k];
        for (var c in channels) { enqueue(consentEvent(channels)); break; }
      }
    },

    /** Stop collecting, drop what is waiting, and record the opt-out in cadence. */
    optOut: function () {
      if (!opts) { warn("call cadence.load() first"); return; }
      var record = consentEvent({ all: false });
      queue = [];
      pending = [];
      local("remove", PREFIX + "queue");
      set("optout", "1");
      set("anonymous_id", anonymousId); // the opt-out must stay linked to this visitor
      sendNow(record, 0);
    },

    /** Undo an opt-out (and give consent); records ``Consent Updated`` with ``{all: true}``. */
    optIn: function () {
      if (!opts) { warn("call cadence.load() first"); return; }
      remove("optout");
      grant();
      enqueue(consentEvent({ all: true }));
    },

    /** Forget the user id and start a new anonymous id (on log-out). */
    reset: function () {
      userId = null;
      remove("user_id");
      anonymousId = uuid();
      if (collecting()) set("anonymous_id", anonymousId);
    },

    /** Send what is waiting now. */
    flush: function () { flush(); },

    /** The current anonymous id. */
    anonymousId: function () { return anonymousId; },

    /** The current user id, or null. */
    userId: function () { return userId; },

    /** Facts for debugging and tests: what is waiting and whether collection is on. */
    state: function () {
      return {
        collecting: !!opts && collecting(),
        optedOut: get("optout") === "1",
        consentRequired: !!(opts && opts.consentRequired),
        queued: queue.length,
        pending: pending.length,
        inflight: inflight
      };
    }
  };

  document.addEventListener("visibilitychange", function () {
    hidden = document.visibilityState === "hidden";
    if (hidden) beaconAll();
    else if (queue.length) schedule(opts ? opts.flushInterval : 0);
  });
  window.addEventListener("pagehide", function () { hidden = true; beaconAll(); });
  window.addEventListener("pageshow", function () { hidden = document.visibilityState === "hidden"; });

  window.cadence = api;

  // Replay calls queued by the snippet stub before the script arrived.
  if (Array.isArray(existing)) {
    for (var i = 0; i < existing.length; i++) {
      var call = existing[i];
      if (call && api[call[0]]) api[call[0]].apply(api, call.slice(1));
    }
  }

  // Or configure from the script tag's data attributes.
  var tag = document.currentScript;
  if (!opts && tag && tag.getAttribute("data-write-key")) {
    var src = tag.getAttribute("src") || "";
    api.load({
      writeKey: tag.getAttribute("data-write-key"),
      host: tag.getAttribute("data-host") || (src ? new URL(src, location.href).origin : ""),
      consentRequired: tag.getAttribute("data-consent-required") === "true"
    });
    if (tag.getAttribute("data-auto-page") !== "false") api.page();
  }
})(window, document);
