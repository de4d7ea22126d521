// The console's own script (no inline scripts: the Content-Security-Policy forbids them).
// - forms with data-confirm ask before they are sent (cancel a job, delete a version);
// - htmx requests carry the session's CSRF token (from <meta name="csrf-token">) as X-CSRF-Token;
// - a fine-tune's loss curve is drawn with uPlot from the points in table#loss-points, and again whenever htmx
//   swaps a fresh table in. Without uPlot (node_modules missing) the table is the curve.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  document.addEventListener("htmx:configRequest", function (event) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta) {
      event.detail.headers["X-CSRF-Token"] = meta.getAttribute("content");
    }
  });

  function lossSeries(table) {
    var steps = [], train = [], evals = [];
    table.querySelectorAll("tr[data-step]").forEach(function (row) {
      steps.push(Number(row.dataset.step));
      train.push(row.dataset.trainLoss !== undefined ? Number(row.dataset.trainLoss) : null);
      evals.push(row.dataset.evalLoss !== undefined ? Number(row.dataset.evalLoss) : null);
    });
    return [steps, train, evals];
  }

  function drawLossChart() {
    var box = document.getElementById("loss-chart");
    var table = document.getElementById("loss-points");
    if (!box || !table || typeof window.uPlot !== "function") {
      return;
    }
    var data = lossSeries(table);
    box.replaceChildren();
    if (data[0].length === 0) {
      return;
    }
    var options = {
      width: Math.max(box.clientWidth, 320),
      height: 280,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss" }],
      series: [
        { label: "step" },
        { label: "train loss", stroke: "#2563eb", width: 2, spanGaps: true },
        { label: "eval loss", stroke: "#d97706", width: 2, spanGaps: true, points: { show: true } },
      ],
    };
    new window.uPlot(options, data, box);
    box.dataset.points = String(data[0].length);
  }

  document.addEventListener("DOMContentLoaded", drawLossChart);
  document.addEventListener("htmx:afterSettle", drawLossChart);
})();
