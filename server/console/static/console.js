// edgefleet console: live updates over server-sent events. The pages work without this script;
// it only refreshes the regions marked data-live (same ids in the fresh page) when the fleet changes.
(function () {
  "use strict";
  var url = document.body.getAttribute("data-live");
  if (!url || !window.EventSource || !window.fetch || !window.DOMParser) { return; }
  var dot = document.getElementById("live-state");
  var busy = false, again = false;
  document.body.setAttribute("data-updates", "0");

  // a region the operator is typing in (focus, or a field changed from what the page was served
  // with) is left alone until they are done
  function inUse(region) {
    if (region.contains(document.activeElement) && document.activeElement !== document.body) { return true; }
    var fields = region.querySelectorAll("input, select, textarea");
    for (var i = 0; i < fields.length; i++) {
      var f = fields[i];
      if (f.type === "hidden") { continue; }
      if ((f.type === "checkbox" || f.type === "radio") ? f.checked !== f.defaultChecked : f.value !== f.defaultValue) {
        return true;
      }
    }
    return false;
  }

  var last = 0, MIN_GAP_MS = 1500;
  function refresh() {
    if (busy) { again = true; return; }
    var wait = last + MIN_GAP_MS - Date.now();
    if (wait > 0) { busy = true; window.setTimeout(function () { busy = false; refresh(); }, wait); return; }
    last = Date.now();
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (r) {
        if (r.redirected || !r.ok) { throw new Error("status " + r.status); }
        return r.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html");
        var regions = document.querySelectorAll("[data-live][id]");
        for (var i = 0; i < regions.length; i++) {
          var next = fresh.getElementById(regions[i].id);
          if (next && !inUse(regions[i])) { regions[i].replaceWith(document.importNode(next, true)); }
        }
        var n = parseInt(document.body.getAttribute("data-updates"), 10) + 1;
        document.body.setAttribute("data-updates", String(n));
      })
      .catch(function () { if (dot) { dot.classList.remove("on"); } })
      .then(function () {
        busy = false;
        if (again) { again = false; window.setTimeout(refresh, 300); }
      });
  }

  var source = new EventSource(url);
  source.addEventListener("open", function () { if (dot) { dot.classList.add("on"); dot.title = "live"; } });
  source.addEventListener("error", function () { if (dot) { dot.classList.remove("on"); dot.title = "reconnecting"; } });
  // the first event carries the stamp at connection time: something may have changed since the page
  // was rendered, so every event (the first included) refreshes
  source.addEventListener("change", refresh);
})();
