// Bot audio out through a small jitter buffer (AudioWorklet, render thread).
// Playback starts once `prebufferSamples` are queued, or at once when a mark says the utterance is
// complete. Running dry mid-stream is an underrun and re-buffers. A mark is echoed when playback
// passes its position; `clear` drops the queue and echoes every pending mark, as the server expects.
class Playback extends AudioWorkletProcessor {
  constructor(options) {
    const o = options.processorOptions;
    super();
    this.prebuffer = o.prebufferSamples;
    this.maxQueued = o.maxBufferSamples;
    this.reportEvery = Math.max(1, Math.round(sampleRate / 10 / 128)); // about 100 ms of render quanta
    this.queue = []; // Float32Array chunks; `head` is the read offset into queue[0]
    this.head = 0;
    this.queued = 0;
    this.written = 0; // stream position of the end of the queue
    this.position = 0; // stream position played (or dropped)
    this.played = 0; // samples actually played
    this.marks = []; // {name, at}: echoed once position >= at
    this.lastMarkAt = -1;
    this.playing = false;
    this.underruns = 0;
    this.dropped = 0;
    this.quanta = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "audio") {
      const pcm = new Int16Array(m.buffer);
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
      this.queue.push(f);
      this.queued += f.length;
      this.written += f.length;
      if (this.queued > this.maxQueued) this.skip(this.queued - this.maxQueued);
    } else if (m.type === "mark") {
      this.marks.push({ name: m.name, at: this.written });
    } else if (m.type === "clear") {
      this.skip(this.queued);
      this.playing = false;
    }
    this.echoPassed();
    this.report();
  }

  skip(n) {
    // Drop the oldest n queued samples (a clear, or a backlog beyond the cap).
    this.dropped += n;
    this.position += n;
    this.queued -= n;
    while (n > 0) {
      const left = this.queue[0].length - this.head;
      if (left > n) { this.head += n; return; }
      n -= left;
      this.queue.shift();
      this.head = 0;
    }
  }

  echoPassed() {
    while (this.marks.length && this.marks[0].at <= this.position) {
      const mark = this.marks.shift();
      this.lastMarkAt = mark.at;
      this.port.postMessage({ type: "mark", name: mark.name });
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued > 0 && (this.queued >= this.prebuffer || this.marks.length)) this.playing = true;
    let i = 0;
    while (this.playing && i < out.length && this.queued > 0) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - i, chunk.length - this.head);
      out.set(chunk.subarray(this.head, this.head + n), i);
      i += n;
      this.head += n;
      this.queued -= n;
      this.position += n;
      this.played += n;
      if (this.head === chunk.length) { this.queue.shift(); this.head = 0; }
    }
    if (this.playing && i < out.length) { // ran dry
      this.playing = false;
      if (this.position !== this.lastMarkAt && !this.marks.some((m) => m.at === this.position)) this.underruns++;
    }
    out.fill(0, i);
    this.echoPassed();
    if (++this.quanta % this.reportEvery === 0) this.report();
    return true;
  }

  report() {
    this.port.postMessage({ type: "stats", played: this.played, underruns: this.underruns, queued: this.queued, dropped: this.dropped });
  }
}

registerProcessor("playback", Playback);
