// LetterThief's only script: conveniences, never needed to read or act on a letter.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const all = document.querySelector("[data-select-all]");
  const boxes = () => Array.from(document.querySelectorAll('input[name="ids"]'));
  const count = document.querySelector("[data-selection]");
  const update = () => {
    if (count) {
      const n = boxes().filter((b) => b.checked).length;
      count.textContent = n ? `${n} selected` : "none selected";
    }
  };
  if (all) {
    all.addEventListener("change", () => { boxes().forEach((b) => { b.checked = all.checked; }); update(); });
  }
  boxes().forEach((b) => b.addEventListener("change", update));

  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) { e.preventDefault(); }
    });
  });

  const editor = document.querySelector('textarea[data-json="true"]');
  const state = document.querySelector("[data-json-state]");
  if (editor && state) {
    const check = () => {
      try { JSON.parse(editor.value); state.textContent = "valid JSON"; state.className = "json-state small ok"; }
      catch (err) { state.textContent = `not valid JSON: ${err.message}`; state.className = "json-state small bad"; }
    };
    editor.addEventListener("input", check);
    check();
  }
});
