// Shared helpers of the tierq pages (no framework, no build step).
"use strict";

window.tq = (() => {
  const $ = (id) => document.getElementById(id);

  // el("td", {className: "x", dataset: {seq: 1}}, "text", childNode, ...)
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  async function loadConfig() {
    const res = await fetch("/ui/config.json", { cache: "no-store" });
    if (!res.ok) throw new Error(`config: HTTP ${res.status}`);
    return res.json();
  }

  // "401 unauthorized: missing API key" from tierq's {"error": {code, message}} bodies.
  async function errorMessage(res) {
    try {
      const body = await res.json();
      if (body && body.error) return `${res.status} ${body.error.code}: ${body.error.message}`;
      if (body && body.detail) return `${res.status}: ${JSON.stringify(body.detail)}`;
    } catch (_) {
      // not JSON
    }
    return `HTTP ${res.status}`;
  }

  function fmtNumber(value, digits = 0) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return Number(value).toFixed(digits);
  }

  return { $, el, loadConfig, errorMessage, fmtNumber };
})();
