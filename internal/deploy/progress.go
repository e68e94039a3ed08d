package deploy

import (
	"strings"
	"sync"

	"github.com/steppe/steppe/internal/progress"
	"github.com/steppe/steppe/internal/upgrade"
)

// reporter is the output's progress.Reporter, for work that reports its
// own tasks (a build).
func (e *env) reporter() *progress.Reporter { return progress.From(e.out) }

// task starts a live line on the output (a machine, a step, a phase); on
// plain output only the line given to its Done is printed, as before.
func (e *env) task(name, phase string) *progress.Task {
	return progress.From(e.out).Start(name, phase)
}

// stepTasks shows the steps of an upgrade (or of a rotation's gated
// restarts) as live tasks, each event's message printed as the line it
// always was.
type stepTasks struct {
	e     *env
	mu    sync.Mutex
	tasks map[string]*progress.Task
}

func newStepTasks(e *env) *stepTasks {
	return &stepTasks{e: e, tasks: map[string]*progress.Task{}}
}

func (s *stepTasks) event(ev upgrade.Event) {
	line := "    " + ev.Message
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tasks[ev.Step]
	switch {
	case ev.Step == "":
		s.e.printf("%s", line)
	case ev.Phase == "done":
		if t == nil {
			s.e.printf("%s", line)
			return
		}
		t.Done(line)
		delete(s.tasks, ev.Step)
	default:
		s.e.printf("%s", line)
		if t == nil {
			t = s.e.task(ev.Step, "")
			s.tasks[ev.Step] = t
		}
		t.Phase("%s", strings.TrimPrefix(ev.Message, ev.Step+": "))
	}
}

// end ends the steps still running: failed with err, else done.
func (s *stepTasks) end(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, t := range s.tasks {
		if err != nil {
			t.Fail(err)
		} else {
			t.Done("")
		}
		delete(s.tasks, id)
	}
}
