/* Live admin pages: listens to the staff stream /ws/admin/ and, on any event, re-fetches the page it is
   on and swaps in the fresh #result_list (changelists) and every #conveyor-live / [data-live] element.
   Re-fetches are coalesced: at most one in flight, and one trailing fetch for whatever arrived meanwhile,
   so a burst of events costs two fetches, not one per event. Elements with data-deadline="<ISO UTC>"
   tick once a second ("12 s left" / "lapsed 3 s ago", class "lapsed" once past); a deadline passing on
   screen also re-fetches, so badges derived from it turn at once. While the socket is down a banner
   #conveyor-live-status says so, and the script reconnects with backoff (0.5 s doubling to 10 s). */
(function () {
  "use strict";

  var LIVE_SELECTORS = ["#result_list", "#conveyor-live", "[data-live]"];
  var MAX_BACKOFF_MS = 10000;
  var fetching = false;
  var again = false;
  var socket = null;
  var backoff = 500;

  function liveElements(root) {
    var found = [];
    LIVE_SELECTORS.forEach(function (selector) {
      root.querySelectorAll(selector).forEach(function (el) {
        if (found.indexOf(el) < 0) found.push(el);
      });
    });
    return found;
  }

  function keyOf(el) {
    if (el.id) return "#" + el.id;
    return "[data-live=" + JSON.stringify(el.getAttribute("data-live")) + "]";
  }

  var dirty = false; /* the operator typed into a form on this page */

  /* An element holding form fields the operator may be editing: only its read-only values are
     replaced, pairwise, so nothing typed is lost. */
  function replaceReadonly(el, next) {
    var mine = el.querySelectorAll("div.readonly");
    var theirs = next.querySelectorAll("div.readonly");
    if (mine.length !== theirs.length) return false;
    mine.forEach(function (old, i) {
      old.replaceWith(document.importNode(theirs[i], true));
    });
    return true;
  }

  function hasFields(el) {
    return el.querySelector("input:not([type=hidden]):not(.action-select):not(#action-toggle), select, textarea") !== null;
  }

  /* Keep what the operator is doing: checked action boxes on a changelist survive a refresh. */
  function checkedValues() {
    var values = [];
    document.querySelectorAll("#result_list input.action-select:checked").forEach(function (box) {
      values.push(box.value);
    });
    return values;
  }

  function restoreChecked(values) {
    if (!values.length) return;
    document.querySelectorAll("#result_list input.action-select").forEach(function (box) {
      if (values.indexOf(box.value) >= 0) {
        box.checked = true;
        var row = box.closest("tr");
        if (row) row.classList.add("selected");
      }
    });
  }

  /* Django's actions.js binds the select-all box and the rows' boxes once, at load: boxes that came
     with a refresh have no handlers (select-all would check nothing). Bind the new ones again. */
  function rebindActions() {
    var boxes = document.querySelectorAll("#result_list tr input.action-select");
    if (!window.Actions || !boxes.length || !document.getElementById("action-toggle")) return;
    var toggle = document.getElementById("action-toggle");
    if (toggle.dataset.conveyorBound) return;
    toggle.dataset.conveyorBound = "1";
    window.Actions(boxes);
    var checked = document.querySelectorAll("#result_list tr input.action-select:checked").length;
    toggle.checked = checked === boxes.length;
  }

  function replaceFrom(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var checked = checkedValues();
    /* A changelist that had no rows has no #result_list to replace, and one that lost its last row
       keeps a stale one: then the whole changelist form is swapped (nothing was selected in it). */
    var hadList = document.getElementById("result_list") !== null;
    var hasList = fresh.getElementById("result_list") !== null;
    var form = document.getElementById("changelist-form");
    var freshForm = fresh.getElementById("changelist-form");
    if (hadList !== hasList && form && freshForm) {
      form.replaceWith(document.importNode(freshForm, true));
    } else {
      var byKey = {};
      liveElements(fresh).forEach(function (el) {
        byKey[keyOf(el)] = el;
      });
      liveElements(document).forEach(function (el) {
        var next = byKey[keyOf(el)];
        if (!next) return;
        if (el.id !== "result_list" && hasFields(el)) {
          if (replaceReadonly(el, next) || dirty) return;
        }
        el.replaceWith(document.importNode(next, true));
      });
      var pager = document.querySelector("#changelist-form p.paginator");
      var freshPager = fresh.querySelector("#changelist-form p.paginator");
      if (pager && freshPager) pager.replaceWith(document.importNode(freshPager, true));
    }
    restoreChecked(checked);
    rebindActions();
    tick();
    document.dispatchEvent(new CustomEvent("conveyor:refreshed"));
  }

  function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    again = false;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Conveyor-Live": "1" } })
      .then(function (response) {
        /* The admin answers a removed object's page with a redirect to the index (or a 404): keep
           what is on screen and say so, rather than swap in another page's content. */
        var moved = response.redirected && new URL(response.url).pathname !== window.location.pathname;
        if (moved || response.status === 404) {
          showStatus("this object no longer exists — it was removed", "gone");
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html) replaceFrom(html);
      })
      .catch(function () {
        /* the next event or reconnect refreshes again */
      })
      .then(function () {
        fetching = false;
        if (again) refresh();
      });
  }

  function formatSeconds(seconds) {
    seconds = Math.abs(seconds);
    if (seconds < 60) return Math.floor(seconds) + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    var h = Math.floor(seconds / 3600);
    var m = Math.floor((seconds % 3600) / 60);
    return h + " h" + (m ? " " + m + " min" : "");
  }

  function tick() {
    var now = Date.now();
    var crossed = false;
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var deadline = Date.parse(el.getAttribute("data-deadline"));
      if (isNaN(deadline)) return;
      var left = (deadline - now) / 1000;
      var wasLapsed = el.classList.contains("lapsed");
      var seen = el.hasAttribute("data-ticked");
      el.setAttribute("data-ticked", "1");
      if (left > 0) {
        el.textContent = formatSeconds(Math.ceil(left)) + " left";
        el.classList.remove("lapsed");
      } else {
        el.textContent = "lapsed " + formatSeconds(-left) + " ago";
        el.classList.add("lapsed");
        if (seen && !wasLapsed) crossed = true;
      }
    });
    if (crossed) refresh();
  }

  function statusBanner() {
    var banner = document.getElementById("conveyor-live-status");
    if (!banner) {
      banner = document.createElement("div");
      banner.id = "conveyor-live-status";
      banner.setAttribute("role", "status");
      banner.hidden = true;
      document.body.appendChild(banner);
    }
    return banner;
  }

  function showStatus(text, kind) {
    var banner = statusBanner();
    banner.textContent = text;
    banner.className = kind || "";
    banner.hidden = false;
  }

  function hideStatus() {
    var banner = statusBanner();
    if (banner.className === "gone") return;
    banner.hidden = true;
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    try {
      socket = new WebSocket(scheme + window.location.host + "/ws/admin/");
    } catch (err) {
      scheduleReconnect();
      return;
    }
    socket.onmessage = function (message) {
      var event;
      try {
        event = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (event.type === "hello") {
        /* Subscribed: from here on no change is missed. Fetch once for whatever changed before (since
           the page was rendered, or while the socket was down). */
        backoff = 500;
        hideStatus();
        document.documentElement.setAttribute("data-conveyor-live", "open");
      }
      refresh();
    };
    socket.onclose = function (close) {
      socket = null;
      document.documentElement.setAttribute("data-conveyor-live", "closed");
      if (close.code === 4401 || close.code === 4403) {
        showStatus("live updates off — log in as staff and reload", "denied");
        return;
      }
      showStatus("live updates paused — reconnecting", "down");
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    var wait = backoff;
    backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    window.setTimeout(connect, wait);
  }

  function start() {
    var toggle = document.getElementById("action-toggle");
    if (toggle) toggle.dataset.conveyorBound = "1"; /* bound by actions.js at load */
    statusBanner();
    document.addEventListener("input", function (event) {
      if (!event.target.classList || !event.target.classList.contains("action-select")) dirty = true;
    });
    tick();
    window.setInterval(tick, 1000);
    connect();
    window.conveyorLive = { refresh: refresh };
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
