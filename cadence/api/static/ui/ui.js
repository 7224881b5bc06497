/* cadence dashboard: draw every <canvas data-chart="ID"> from <script type="application/json" id="ID">. */
(function () {
  "use strict";
  window.cadenceCharts = {};
  function draw() {
    if (typeof window.Chart === "undefined") { return; }
    window.Chart.defaults.animation = false; // draw at once: pages are read, not watched
    window.Chart.defaults.maintainAspectRatio = false;
    var canvases = document.querySelectorAll("canvas[data-chart]");
    for (var i = 0; i < canvases.length; i++) {
      var canvas = canvases[i];
      var source = document.getElementById(canvas.getAttribute("data-chart"));
      if (!source) { continue; }
      var config = JSON.parse(source.textContent);
      window.cadenceCharts[canvas.getAttribute("data-chart")] = new window.Chart(canvas, config);
    }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
