/* audsync dashboard: a little progressive enhancement; every page works without it.
 * - <time datetime="...Z"> shown in the viewer's time zone (the UTC time stays on hover);
 * - a page with data-poll on <main> (a run queued or running) refreshes its content in place
 *   until the run ends;
 * - the syncs filter applies as you type;
 * - a form's button is disabled once clicked, so a double click sends one request. */
(function () {
  "use strict";

  var format = (function () {
    try {
      var f = new Intl.DateTimeFormat(undefined, {
        year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"
      });
      return function (d) { return f.format(d); };
    } catch (e) {
      return function (d) { return d.toLocaleString(); };
    }
  })();

  function localTimes(root) {
    var items = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < items.length; i++) {
      var el = items[i];
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d.getTime())) continue;
      el.textContent = format(d);
      el.classList.add("local");
    }
    var labels = root.querySelectorAll("svg [data-datetime]");  // chart axes
    for (var j = 0; j < labels.length; j++) {
      var t = new Date(labels[j].getAttribute("data-datetime"));
      if (!isNaN(t.getTime())) labels[j].textContent = format(t);
    }
  }

  function guardForms(root) {
    var forms = root.querySelectorAll("form[method=post]");
    for (var i = 0; i < forms.length; i++) {
      forms[i].addEventListener("submit", function (event) {
        var button = event.target.querySelector("button[type=submit]");
        if (button) { setTimeout(function () { button.disabled = true; }, 0); }
      });
    }
  }

  function filters(root) {
    var form = root.querySelector("form[data-filter-table]");
    if (!form) return;
    var table = document.getElementById(form.getAttribute("data-filter-table"));
    if (!table) return;
    var q = form.querySelector("[name=q]"), status = form.querySelector("[name=status]");
    var none = document.getElementById("filter-none");
    function apply() {
      var needle = (q.value || "").trim().toLowerCase(), wanted = status.value, shown = 0;
      var rows = table.tBodies[0].rows;
      for (var i = 0; i < rows.length; i++) {
        var row = rows[i];
        var ok = (!wanted || row.getAttribute("data-status") === wanted) &&
                 (!needle || (row.getAttribute("data-text") || "").indexOf(needle) !== -1);
        row.hidden = !ok;
        if (ok) shown++;
      }
      if (none) none.hidden = shown !== 0;
      var params = new URLSearchParams();
      if (needle) params.set("q", q.value.trim());
      if (wanted) params.set("status", wanted);
      var query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
    }
    q.addEventListener("input", apply);
    status.addEventListener("change", apply);
  }

  function poll() {
    var main = document.getElementById("main");
    var every = main && parseInt(main.getAttribute("data-poll"), 10);
    if (!every) return;
    setTimeout(function () {
      var url = location.pathname + location.search.replace(/([?&])done=[^&]*&?/, "$1").replace(/[?&]$/, "");
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (answer) {
          if (!answer.ok || answer.redirected) { throw new Error("status " + answer.status); }
          return answer.text();
        })
        .then(function (html) {
          var page = new DOMParser().parseFromString(html, "text/html");
          var fresh = page.getElementById("main");
          if (!fresh) return;
          main.innerHTML = fresh.innerHTML;
          if (fresh.hasAttribute("data-poll")) {
            main.setAttribute("data-poll", fresh.getAttribute("data-poll"));
          } else {
            main.removeAttribute("data-poll");
          }
          enhance(main);
          poll();
        })
        .catch(function () { setTimeout(poll, every * 4); });
    }, every);
  }

  function enhance(root) {
    localTimes(root);
    guardForms(root);
    filters(root);
  }

  document.addEventListener("DOMContentLoaded", function () {
    enhance(document);
    poll();
  });
})();
